"""Write our task data as lm-eval 0.4 task configs over local files, to run lm-eval itself on the same items.

    python -m blockformer.eval.lm_eval_tasks OUT_DIR --tasks piqa,arc_easy --limit 200 [--data-dir DIR]
    lm_eval --model hf --model_args pretrained=MODEL --tasks piqa_local,arc_easy_local --include_path OUT_DIR

Prompts, choices and metrics are lm-eval's own (the YAML below is the upstream task's, pointed at a JSON file; where
upstream uses Python functions, wikitext's and winogrande's, they are imported from lm-eval). Every exported row
carries `blockformer_index`, its row in the full task file, which is `doc` in our samples.json: lm-eval's logged
samples (`doc.blockformer_index`) and ours can be joined item by item.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import BlockformerError
from .tasks import TASKS, _read, default_data_dir, get_task, hellaswag_from_original, subset_index

_MC = "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
TEMPLATES = {
    "hellaswag": 'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n' + _MC,
    "piqa": 'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
            'doc_to_choice: "{{[sol1, sol2]}}"\n' + _MC,
    "arc_easy": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices.label.index(answerKey)}}"\n'
                'doc_to_choice: "{{choices.text}}"\n' + _MC,
    "sciq": 'doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"\ndoc_to_target: 3\n'
            'doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"\n' + _MC,
    "lambada_openai": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                      "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: perplexity\n"
                      "  - metric: acc\n",
    "wikitext": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                "doc_to_target: !function preprocess_wikitext.wikitext_detokenizer\n"
                "process_results: !function preprocess_wikitext.process_results\nmetric_list:\n"
                "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
}
TEMPLATES["arc_challenge"] = TEMPLATES["arc_easy"]
# winogrande scores a shared continuation after one context per option (lm-eval's "multiple input")
TEMPLATES["winogrande"] = ("doc_to_text: !function preprocess_winogrande.doc_to_text\n"
                           "doc_to_target: !function preprocess_winogrande.doc_to_target\n"
                           "doc_to_choice: !function preprocess_winogrande.doc_to_choice\n"
                           "metric_list:\n  - metric: acc\n")
# rows as the templates read them: hub rows of hellaswag in lm-eval's processed layout; winogrande's answer a string
ROWS = {"hellaswag": hellaswag_from_original, "winogrande": lambda r: {**r, "answer": str(r["answer"])}}
# lm-eval's own functions, imported, not copied
HELPERS = {"wikitext": "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer",
           "winogrande": "from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice, doc_to_target, "
                         "doc_to_text"}


def export(tasks: list[str], data_dir: Path | None, out: Path, limit: int | None = None, seed: int = 1234) -> list[str]:
    """Write `<task>_local.yaml` + `<task>.jsonl` (the same fixed-seed subset `blockformer eval` uses)."""
    if not tasks:
        raise BlockformerError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks:
        raw, _ = _read(get_task(name), data_dir)  # the rows load_docs reads, from the same place
        to_row = ROWS.get(name, dict)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in subset_index(len(raw), limit, seed):
                f.write(json.dumps({**to_row(raw[i]), "blockformer_index": i}) + "\n")
        kind = "" if "output_type" in TEMPLATES[name] else "output_type: multiple_choice\n"
        path = json.dumps(str((out / f"{name}.jsonl").resolve()))  # quoted: a path may hold YAML's special characters
        (out / f"{name}_local.yaml").write_text(
            f"task: {name}_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path}\ntest_split: test\n{kind}{TEMPLATES[name]}")
        names.append(f"{name}_local")
    for name in set(tasks) & set(HELPERS):
        (out / f"preprocess_{name}.py").write_text(HELPERS[name] + "  # noqa: F401\n")
    return names


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tasks", default=",".join(TASKS), show_default=True, help="Tasks to export.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Local task files.")
@click.option("--limit", type=int, default=None, help="Fixed-seed subset size (as `blockformer eval --limit`).")
@click.option("--seed", default=1234, show_default=True, help="Subset seed.")
def main(out, tasks, data_dir, limit, seed):
    """Write lm-eval task configs over local copies of our task data."""
    try:
        names = export([t.strip() for t in tasks.split(",") if t.strip()], data_dir or default_data_dir(), out,
                       limit, seed)
    except BlockformerError as e:
        raise click.ClickException(str(e)) from e
    click.echo(",".join(names))


if __name__ == "__main__":
    main()
