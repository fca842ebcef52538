"""Generation throughput, Block Transformer vs its original through Hugging Face generate (same run, same dtype).

    python bench/generation.py out/smollm2-block --baseline default             # prefill-heavy 2048/128 @ 8,
                                                                                # decode-heavy 128/2048 @ 16
    python bench/generation.py out/smollm2-block --baseline default --quick     # 1024/32 and 128/256
    python bench/generation.py out/tiny --baseline tiny-orig --prompt-len 16 --gen-len 8 --batch-sizes 1,2

The same as `blockformer bench`; prints a table and ends with one JSON line.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer.cli import bench  # noqa: E402

if __name__ == "__main__":
    bench(prog_name="bench/generation.py")
