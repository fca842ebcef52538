"""Write our task data as lm-eval 0.4 task configs over local files, to run lm-eval itself on the same items.

    python -m blockformer.eval.lm_eval_tasks OUT_DIR --tasks piqa,arc_easy --limit 200 --data-dir ../shared/data
    lm_eval --model hf --model_args pretrained=MODEL --tasks piqa_local,arc_easy_local --include_path OUT_DIR

Prompts, choices and metrics are lm-eval's own (the YAML below is the upstream task's, pointed at a JSON file).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import click

from .tasks import default_data_dir, get_task

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


def export(tasks: list[str], data_dir: Path | None, out: Path, limit: int | None = None, seed: int = 1234) -> list[str]:
    """Write `<task>_local.yaml` + `<task>.jsonl` (the same fixed-seed subset `blockformer eval` uses)."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks:
        task = get_task(name)
        if name not in TEMPLATES:
            raise click.ClickException(f"no lm-eval template for {name}")
        raw = task.read_local(next(Path(data_dir) / r for r in task.local if (Path(data_dir) / r).is_file()))
        index = range(len(raw))
        if limit is not None and limit < len(raw):
            index = sorted(random.Random(seed).sample(list(index), limit))
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in index:
                f.write(json.dumps(raw[i]) + "\n")
        kind = "" if "output_type" in TEMPLATES[name] else "output_type: multiple_choice\n"
        (out / f"{name}_local.yaml").write_text(
            f"task: {name}_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {(out / f'{name}.jsonl').resolve()}\ntest_split: test\n{kind}{TEMPLATES[name]}")
        names.append(f"{name}_local")
    if "wikitext" in tasks:  # lm-eval's own detokeniser and word/byte counts, imported, not copied
        (out / "preprocess_wikitext.py").write_text(
            "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa\n")
    return names


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tasks", default="piqa,arc_easy,lambada_openai,wikitext", show_default=True, help="Tasks to export.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Local task files.")
@click.option("--limit", type=int, default=None, help="Fixed-seed subset size (as `blockformer eval --limit`).")
@click.option("--seed", default=1234, show_default=True, help="Subset seed.")
def main(out, tasks, data_dir, limit, seed):
    """Write lm-eval task configs over local copies of our task data."""
    names = export(tasks.split(","), data_dir or default_data_dir(), out, limit, seed)
    click.echo(",".join(names))


if __name__ == "__main__":
    main()
