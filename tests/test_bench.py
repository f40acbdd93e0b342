"The benchmark harness runs (a smoke test on the tiny model; no time is asserted)."
import json
import subprocess
import sys


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--steps", "2", "--warmup", "1", "--images", "8",
                        "--configs", "documented-plain,documented,documented-merged,b8-checkpointing", "--workdir", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["config"] for row in report["results"]] == ["documented-plain", "documented", "documented-merged", "b8-checkpointing"]
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    assert "| documented-merged | 1 x 4 |" in r.stdout


def test_bench_attributes_mode_reports_the_per_call_costs(tmp_path):
    out = tmp_path / "attributes.json"
    r = subprocess.run([sys.executable, "bench/bench.py", "--tiny", "--attributes", "--images", "8", "--workdir",
                        str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["results"] == []  # no training in this mode
    costs = report["attribute_ms"]
    assert set(costs) == {"unet_modules", "unet.device", "unet.dtype", "vae.device", "vae.dtype", "device_dtype(unet)",
                          "device_dtype(vae)"}
    assert costs["unet_modules"] > 100 and all(v > 0 for v in costs.values())
