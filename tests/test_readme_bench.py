"""tools/readme_bench.py: the README's benchmark blocks are rebuilt from the saved records only
(each number in a row is the record's), prose outside the markers stays, and --check passes on
the result and fails on a hand-edited number or a missing record."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_bench", ROOT / "tools" / "readme_bench.py")
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

README = """# title

Prose before.

<!-- bench-ntk-speed:begin -->
| typed by hand | 0.001 s |
<!-- bench-ntk-speed:end -->

Prose between.

<!-- bench-out-of-core:begin -->
<!-- bench-out-of-core:end -->

<!-- bench-zoo:begin -->
<!-- bench-zoo:end -->

<!-- bench-telescope-lens:begin -->
<!-- bench-telescope-lens:end -->

<!-- bench-smoother:begin -->
<!-- bench-smoother:end -->
"""


def _record(rows, **extra):
    return {"argv": ["bench/x.py", "--save", "r.json"], "commit": "abc1234", "machine": "m",
            "date": "2026-12-01", "rows": rows, **extra}


def _write_records(results: Path) -> None:
    results.mkdir()
    speed = [
        {"model": "mlp", "n": 256, "threads": 1, "output": "full", "method": "jacobian",
         "seconds": 36.1, "peak_mb": 8000.0},
        {"model": "mlp", "n": 256, "threads": 1, "output": "full", "method": "structured",
         "seconds": 0.1113, "peak_mb": 39.5, "speedup_vs_jacobian": 324.3, "gflop": 9.41,
         "achieved_gflops": 84.5, "matmul_peak_gflops": 107.4, "x_flop_limit": 1.27,
         "neural_tangents_s": 0.1306, "vs_neural_tangents": 0.85},
    ]
    tr = [{"model": "transformer", "n": 256, "threads": 2, "output": "trace",
           "method": "structured", "seconds": 61.7, "peak_mb": 1500.0, "gflop": 5000.0,
           "achieved_gflops": 81.0, "matmul_peak_gflops": 180.0, "x_flop_limit": 2.2}]
    ooc = [
        {"phase": "local", "n": 20000, "block": 2048, "threads": 2, "seconds": 30.3,
         "peak_rss_gb": 1.48, "block_pairs": 55, "seconds_per_pair": 0.551, "gflops": 150.5},
        {"phase": "rerun", "n": 20000, "block": 2048, "threads": 2, "seconds": 10.9,
         "peak_rss_gb": 1.09, "killed_after_seconds": 21.4, "blocks_kept": 36,
         "block_pairs": 55, "equal_to_local": True},
        {"phase": "solve", "n": 20000, "block": 2048, "threads": 2, "test_kernel_seconds": 7.4,
         "solve_seconds": 86.4, "iterations": 113, "relative_residual": 9.98e-7,
         "ridge_relative_to_mean_diagonal": 0.001, "rank": 1000, "test_accuracy": 0.699,
         "n_test": 2000, "seconds": 93.8, "peak_rss_gb": 1.73},
    ]
    projection = {"n": 60000, "block_pairs": 465, "gigabytes": 14.4,
                  "this_machine_minutes": 4.54, "ray_minutes": {"4": 1.13, "16": 0.28},
                  "tflop": 41.1, "gpu_tflops": 30.0, "gpu_seconds": 1.37}
    zoo = [
        {"model": "GPT-2", "n": 32, "parameters": 923904, "on_rules": 1.0,
         "method": "structured", "seconds": 0.15, "relative_error": 2.8e-7},
        {"model": "GPT-2", "n": 32, "parameters": 923904, "on_rules": 1.0,
         "method": "jacobian", "seconds": 1.29, "relative_error": 1.5e-7},
        {"model": "GPT-2", "n": 32, "method": "torch.func vmap(jacrev)", "failed": "vmap"},
    ]
    for name, record in (("ntk_speed", _record(speed)), ("ntk_speed_transformer", _record(tr)),
                         ("out_of_core", _record(ooc, projection=projection)),
                         ("zoo", _record(zoo)),
                         ("telescope_lens", _record([{"case": "net", "bare_ms": 1.0,
                                                      "lens_ms": 3.0, "batch": 200,
                                                      "probes": 1000}], threads=1)),
                         ("smoother", _record([{"train_ms": 1.0, "with_smoother_ms": 28.0,
                                                "naive_kernel_ms": 540.0}], threads=2))):
        (results / f"{name}.json").write_text(json.dumps(record))


def test_blocks_come_from_the_records_and_check_catches_edits(tmp_path, capsys):
    results = tmp_path / "results"
    _write_records(results)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert rb.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert rb.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "typed by hand" not in text
    assert "Prose before." in text and "Prose between." in text
    rows = [line for line in text.splitlines() if line.startswith("| MLP")]
    assert rows == ["| MLP 40-512-512-10, full, N = 256 | 1 | 0.111 s | 36.1 s (324x) "
                    "| 0.131 s (0.85) | 9.41 | 84.5 (107) | 1.3 | 40 |"]
    assert "| transformer (2 layers, d 128, 4 heads, seq 16, 128 logits), trace, N = 256 | 2 " \
           "| 61.7 s | - | - |" in text
    assert "36 of 55 blocks kept" in text and "bit for bit: yes" in text
    assert "113 iterations" in text and "test accuracy 0.699" in text
    assert "this machine 5 min" in text and "1.1 min with 4" in text
    assert "commit abc1234" in text
    assert ("| GPT-2, 0.9M parameters, N = 32 | 0.15 s | 1.29 s (9x) | fails | 100% "
            "| 2.8e-07 / 1.5e-07 / - |") in text
    assert "| net | 1 ms | 3 ms | 3.0x | 0.4x |" in text      # (3 - 1) / 1000 over 1 / 200
    assert "| 2 | 1 ms | 28 ms | 2.3 min | 540 ms (20x the smoother's update) |" in text
    assert rb.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    readme.write_text(text.replace("113 iterations", "100 iterations"))
    assert rb.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    (results / "out_of_core.json").unlink()
    assert rb.main(["--readme", str(readme), "--results", str(results), "--check"]) == 2
    assert "no " in capsys.readouterr().err
