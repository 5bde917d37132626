"""PSNR and MS-SSIM in the job beside SSIM: columns from the same decoded pixels and batches, their typed
undefined cases, their mergeable statistics and gates, the metric digest, and (slow) whole Ray runs with the
basicsr and skimage_default presets over pairs of the built-in sample set against the reference functions
per pair.

The fast tests score one real shard with the actor's own `ShardComputer` (no Ray): photographs under JPEG,
noise and blur at odd and even sizes, an identical pair (PSNR +inf), an inverted pair (MS-SSIM undefined:
a negative contrast-structure term), a pair too small for five scales, and a missing file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from reference_impls import basicsr_psnr, basicsr_ssim, basicsr_to_y, chw, msssim_m, msssim_m_color, photo_pair
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ssim_ray import sources
from ssim_ray.config import AuditConfig, AuditJobConfig, BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
from ssim_ray.metric import ms_ssim, psnr, ssim
from ssim_ray.output.commit import write_shard
from ssim_ray.output.gates import EXIT_OK, EXIT_QUALITY_GATE, evaluate_gates, exit_code
from ssim_ray.output.merge import RunInfo, merge
from ssim_ray.output.resume import ResumeConflictError, check_resume_compatible, run_manifest
from ssim_ray.output.schema import RESULT_SCHEMA, rows_to_table, validate_result_table
from ssim_ray.output.stamps import metric_digest
from ssim_ray.output.stats import merge_stats, stats_to_json
from ssim_ray.output.table_stats import shard_stats
from ssim_ray.sources.decode import decode_image
from ssim_ray.sources.sample import ensure_sample_dataset
from ssim_ray.worker import ShardComputer, WorkerSpec

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL = ("ssim", "psnr", "ms_ssim")
# fp32 against float64 references: MS-SSIM multiplies five float32 means raised to powers (each ~1e-7 off);
# PSNR's MSE of uint8 pixels is exact, only the float32 rounding of the dB value remains (~1e-7 relative).
FP32_TOL, PSNR_RTOL_FP32 = 1e-6, 1e-6
# fp64 presets against float64 transcriptions: the same sums in another order (SSIM 1e-10, as the presets
# promise), PSNR relative as scikit-image's own test tolerance, MS-SSIM five such means multiplied.
SSIM_TOL, PSNR_RTOL, MS_SSIM_TOL = 1e-10, 1e-9, 1e-9


def _save(path: Path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path, format="PNG")
    return path.name


def _pairs():
    """(pair_id, kind, reference, distorted): real photographs, odd and even sizes, and the undefined cases."""
    camera, _ = photo_pair("camera", 200, 200, "blur", 1.0, mode="L", top=100, left=150)
    same, _ = photo_pair("chelsea", 181, 177, "jpeg", 50, top=40, left=90)
    return [
        ("odd_jpeg", "jpeg", *photo_pair("astronaut", 181, 177, "jpeg", 30, top=20, left=180)),
        ("odd_same", "same", same, same.copy()),
        ("noise", "noise", *photo_pair("coffee", 200, 240, "noise", 12.0, top=60, left=200)),
        ("blur_gray", "blur", *photo_pair("camera", 192, 256, "blur", 1.5, mode="L", top=50, left=100)),
        ("inverted", "inverted", camera, 255 - camera),
        ("small", "noise", *photo_pair("astronaut", 100, 120, "noise", 10.0, top=100, left=150)),
    ]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("metric-pairs")
    rows = []
    for pair_id, kind, ref, dist in _pairs():
        rows.append({"pair_id": pair_id, "reference": _save(root / f"{pair_id}_ref.png", ref),
                     "distorted": _save(root / f"{pair_id}_dist.png", dist), "kind": kind})
    rows.append({"pair_id": "missing", "reference": rows[0]["reference"], "distorted": "nowhere.png", "kind": "bad"})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


def _rows(manifest: Path, metrics=ALL, ssim_cfg: SSIMConfig = None) -> list:
    source = SourceConfig(kind="parquet", url=str(manifest), pairs_per_shard=64)
    spec = WorkerSpec(source=source, ssim=ssim_cfg or SSIMConfig(compile="never"), batch=BatchConfig(size=8),
                      summary=SummaryConfig(), output_url="unused", output_storage_options={}, device="cpu",
                      torch_threads=1, decode_threads=1, memory_share=1.0, metrics=tuple(metrics))
    (shard,) = sources.plan_shards(source).shards
    return ShardComputer(spec).compute_rows(shard)


@pytest.fixture(scope="module")
def rows(manifest) -> dict:
    return {row["pair_id"]: row for row in _rows(manifest)}


def _tensors(manifest: Path, row: dict):
    def load(name: str) -> torch.Tensor:
        array = np.asarray(Image.open(manifest.parent / name))
        return torch.from_numpy(chw(array))

    return load(row["reference"]), load(row["distorted"])


@pytest.mark.slow  # the module's shard is scored once with every metric: ~15 s on 2 cores
def test_each_ok_row_holds_every_metric_with_the_bits_of_a_direct_call(manifest, rows):
    defined = 0
    for pair_id, row in rows.items():
        if row["status"] != "ok" or row["ms_ssim"] is None:
            continue
        x, y = _tensors(manifest, row)
        # Bitwise: the same decoded pixels, and every metric is batch-invariant.
        assert row["ssim"] == float(ssim(x, y, compile="never")), pair_id
        assert row["psnr"] == float(psnr(x, y)), pair_id
        assert row["psnr_per_channel"] == psnr(x, y, per_channel=True).tolist(), pair_id
        assert row["ms_ssim"] == float(ms_ssim(x, y, compile="never")), pair_id
        assert row["ms_ssim_per_channel"] == ms_ssim(x, y, per_channel=True, compile="never").tolist(), pair_id
        # And the references: scikit-image's PSNR, msssim.m's float64 transcription (per channel, mean).
        if torch.equal(x, y):  # scikit-image divides by a zero MSE (and warns): +inf
            assert row["psnr"] == math.inf and row["psnr_per_channel"] == [math.inf] * row["channels"]
            assert row["ms_ssim"] == 1.0
        else:
            want_psnr = peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=255)
            assert abs(row["psnr"] - want_psnr) <= PSNR_RTOL_FP32 * want_psnr, pair_id
        assert abs(row["ms_ssim"] - msssim_m_color(x.numpy(), y.numpy())) <= FP32_TOL, pair_id
        assert row["ms_ssim_undefined"] is None
        defined += 1
    assert defined == 4  # odd_jpeg, odd_same, noise, blur_gray


@pytest.mark.slow  # the module's shard is scored once with every metric: ~15 s on 2 cores
def test_undefined_ms_ssim_is_a_typed_null_and_the_pair_keeps_ssim_and_psnr(manifest, rows):
    inverted, small = rows["inverted"], rows["small"]
    x, y = _tensors(manifest, inverted)
    # The inverted image's contrast-structure term is negative: msssim.m's power would be complex.
    assert np.isnan(msssim_m(x.numpy()[0], y.numpy()[0]))
    assert (inverted["status"], inverted["ms_ssim"], inverted["ms_ssim_undefined"]) == ("ok", None, "nonpositive_term")
    assert (small["status"], small["ms_ssim"], small["ms_ssim_undefined"]) == ("ok", None, "too_small")
    for row in (inverted, small):
        x, y = _tensors(manifest, row)
        assert row["ssim"] == float(ssim(x, y, compile="never")) and row["psnr"] == float(psnr(x, y))
        assert row["ms_ssim_per_channel"] is None
    missing = rows["missing"]
    assert missing["status"] == "missing"
    assert all(missing[c] is None for c in ("ssim", "psnr", "psnr_per_channel", "ms_ssim", "ms_ssim_undefined"))
    table = rows_to_table(list(rows.values()), ["kind"])
    validate_result_table(table, shard_id=missing["shard_id"])
    for column in ("ssim", "psnr", "ms_ssim"):
        assert not pa.compute.any(pa.compute.is_nan(table[column])).as_py()


@pytest.mark.slow  # scores the shard again (SSIM only): ~10 s on 2 cores
def test_metrics_not_chosen_leave_their_columns_null_in_the_one_schema(manifest, rows):
    only_ssim = {row["pair_id"]: row for row in _rows(manifest, metrics=("ssim",))}
    table = rows_to_table(list(only_ssim.values()), ["kind"])
    assert table.schema.equals(pa.schema(list(RESULT_SCHEMA) + [pa.field("kind", pa.string())]))
    assert table["ssim"].null_count == 1  # only the missing pair
    for column in ("psnr", "psnr_per_channel", "ms_ssim", "ms_ssim_per_channel", "ms_ssim_undefined"):
        assert table[column].null_count == table.num_rows, column
    # The SSIM of a pair does not depend on which other metrics were computed.
    assert all(only_ssim[p]["ssim"] == rows[p]["ssim"] for p in only_ssim)


@pytest.fixture(scope="module")
def merged(rows, tmp_path_factory):
    """rows in two shards, merged with group_by=kind; the summary and the merged statistics of each split."""
    out = tmp_path_factory.mktemp("metric-out")
    cfg = SummaryConfig(group_by="kind")
    ordered = list(rows.values())
    parts = {"s0": ordered[:3], "s1": ordered[3:]}
    stats = []
    for shard_id, shard_rows in parts.items():
        for row in shard_rows:
            row["shard_id"] = shard_id
        table = rows_to_table(shard_rows, ["kind"])
        stats.append(shard_stats(table, cfg))
        write_shard(str(out), shard_id, table, stats=stats[-1])
    whole = shard_stats(rows_to_table(ordered, ["kind"]), cfg)
    audit = AuditConfig(min_psnr=20.0, min_ms_ssim=0.5, psnr_max_fraction_below=1.0, ms_ssim_max_fraction_below=1.0)
    info = RunInfo(metric=AuditJobConfig(metrics=list(ALL)).describe_metric(), plan_fingerprint="f",
                   total_pairs=len(ordered))
    summary = merge(str(out), plan_shard_ids=list(parts), run_info=info, summary_cfg=cfg, audit_cfg=audit)
    return out, cfg, summary, merge_stats(*stats), whole, info


@pytest.mark.slow  # the module's shard is scored once with every metric: ~15 s on 2 cores
def test_summary_counts_infinite_psnr_and_undefined_ms_ssim_apart_from_the_statistics(rows, merged):
    _, _, summary, _, _, _ = merged
    ok = [r for r in rows.values() if r["status"] == "ok"]
    finite_psnr = [r["psnr"] for r in ok if math.isfinite(r["psnr"])]
    block = summary["psnr"]
    assert block["infinite"] == 1 and block["count"] == len(finite_psnr) == len(ok) - 1
    assert block["mean"] == pytest.approx(np.mean(finite_psnr), rel=1e-12)  # +inf never in a mean
    assert block["max"] == max(finite_psnr) and block["percentiles"]["p50"] == pytest.approx(np.median(finite_psnr))
    assert sum(count for _, count in block["histogram"]["counts"]) == block["count"]
    values = [r["ms_ssim"] for r in ok if r["ms_ssim"] is not None]
    block = summary["ms_ssim"]
    assert block["undefined"] == {"nonpositive_term": 1, "too_small": 1}
    assert block["count"] == len(values) and block["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert block["infinite"] == 0 and block["histogram"]["range"] == [0.0, 1.0]
    # Per group too: the identical pair's group has only an infinite PSNR and MS-SSIM 1.
    same = summary["groups"]["same"]
    assert (same["psnr"]["count"], same["psnr"]["infinite"], same["psnr"]["mean"]) == (0, 1, None)
    assert same["ms_ssim"]["max"] == 1.0 and summary["groups"]["inverted"]["ms_ssim"]["undefined"] == {
        "nonpositive_term": 1}
    assert summary["metric"]["metrics"] == list(ALL)
    json.dumps(summary, allow_nan=True)  # +inf is never written: no count or mean holds it


@pytest.mark.slow  # the module's shard is scored once with every metric: ~15 s on 2 cores
def test_metric_statistics_are_mergeable(merged):
    _, _, _, summed, whole, _ = merged
    a, b = stats_to_json(summed), stats_to_json(whole)
    for part in (a, b):  # float sums differ in the last bits with the order; counts and bins are exact
        for group in [part["overall"], *part["groups"].values()]:
            for block in [group["moments"], *(s["moments"] for s in group["scores"].values())]:
                block.pop("mean"), block.pop("m2")
    assert a == b


@pytest.mark.slow  # the module's shard is scored once with every metric: ~15 s on 2 cores
def test_psnr_and_ms_ssim_gates_follow_min_ssims_rules(rows, merged):
    out, cfg, summary, _, _, info = merged
    ok = [r for r in rows.values() if r["status"] == "ok"]
    lowest = min(r["psnr"] for r in ok)

    def gated(audit: AuditConfig):
        result = merge(str(out), plan_shard_ids=["s0", "s1"], run_info=info, summary_cfg=cfg, audit_cfg=audit)
        violations = evaluate_gates(result, audit)
        return violations, exit_code(violations)

    assert gated(AuditConfig(min_psnr=lowest))[1] == EXIT_OK  # a pair exactly at the limit passes
    violations, code = gated(AuditConfig(min_psnr=float(np.nextafter(lowest, 100))))
    assert code == EXIT_QUALITY_GATE and [v.gate for v in violations] == ["min_psnr"]
    assert "1 of 6 ok pairs" in violations[0].message  # +inf counted among the ok pairs, never below
    # MS-SSIM judges 5 pairs: 4 values and the nonpositive term (below every threshold); too_small is not measured.
    lowest_ms = min(r["ms_ssim"] for r in ok if r["ms_ssim"] is not None)
    violations, code = gated(AuditConfig(min_ms_ssim=lowest_ms))
    assert code == EXIT_QUALITY_GATE and "1 of 5 ok pairs judged by MS-SSIM" in violations[0].message
    assert gated(AuditConfig(min_ms_ssim=lowest_ms, ms_ssim_max_fraction_below=0.2))[1] == EXIT_OK
    assert gated(AuditConfig(min_ms_ssim=lowest_ms, ms_ssim_max_fraction_below=0.19))[1] == EXIT_QUALITY_GATE
    violations, _ = gated(AuditConfig(group_min_psnr=25.0))
    groups = {r["kind"] for r in ok if r["psnr"] < 25.0}
    assert {v.group for v in violations} == groups | {"bad"}  # the bad group has no ok pair at all
    violations, _ = gated(AuditConfig(group_min_ms_ssim=0.01))
    # The inverted pair is below; the too-small noise pair is left out and the group's other pair passes.
    assert {v.group for v in violations} == {"inverted", "bad"}


def test_a_gate_on_a_metric_not_computed_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"audit.min_ms_ssim needs ms_ssim among the metrics computed"):
        AuditJobConfig(audit=AuditConfig(min_ms_ssim=0.9))
    with pytest.raises(ValueError, match="metrics must include ssim"):
        AuditJobConfig(metrics=["psnr"])
    with pytest.raises(ValueError, match=r"unknown: \['lpips'\]"):
        AuditJobConfig(metrics=["ssim", "lpips"])
    with pytest.raises(ValueError, match="audit.ms_ssim_max_fraction_below needs audit.min_ms_ssim"):
        AuditConfig(ms_ssim_max_fraction_below=0.1)


def _compose(*overrides: str) -> AuditJobConfig:
    from ssim_ray.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_object(compose("ssim_audit", overrides=["output.url=/tmp/out", *overrides]))


def test_metrics_compose_from_the_command_line_and_are_checked_when_built():
    assert _compose().chosen_metrics() == ("ssim", "psnr")  # conf/ssim_audit.yaml's default
    assert _compose("metrics=[ms_ssim,ssim,psnr]").describe_metric()["metrics"] == list(ALL)
    with pytest.raises(ValueError, match=r"metrics must name only \['ssim', 'psnr', 'ms_ssim'\]"):
        _compose("metrics=[ssim,lpips]")
    with pytest.raises(ValueError, match="audit.group_min_psnr needs summary.group_by"):
        _compose("source=parquet", "source.url=/m.parquet", "audit.group_min_psnr=30")


@pytest.mark.slow  # a fresh interpreter importing torch and Hydra: ~8 s
def test_a_gate_on_a_metric_not_computed_stops_the_job_before_hydra_saves_anything(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "jobs.ssim_audit", "audit.min_ms_ssim=0.9", f"hydra.run.dir={run_dir}"],
                          cwd=CONF.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "audit.min_ms_ssim needs ms_ssim among the metrics computed" in done.stderr
    assert not run_dir.exists()  # neither Hydra's .hydra/ nor any result


def test_other_metrics_change_the_metric_digest_and_a_resume_refuses_them(tmp_path):
    default, more = AuditJobConfig(), AuditJobConfig(metrics=list(ALL))
    assert default.describe_metric() == default.ssim.describe()  # [ssim, psnr] is the default
    assert metric_digest(default.describe_metric()) != metric_digest(more.describe_metric())
    plan = sources.Plan(shards=(), fingerprint="f", total_pairs=0, passthrough_columns=())
    check_resume_compatible(str(tmp_path), run_manifest(plan=plan, cfg=default), mode="resume")
    with pytest.raises(ResumeConflictError, match=r"metric.metrics: output has \['ssim', 'psnr'\], this run has"):
        check_resume_compatible(str(tmp_path), run_manifest(plan=plan, cfg=more), mode="resume")
    assert check_resume_compatible(str(tmp_path), run_manifest(plan=plan, cfg=more), mode="overwrite") == "overwrite"


# --------------------------------------------------------------------------------- whole runs (Ray, slow)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


# Two photographs of the sample set, all 17 of their pairs (JPEG at six qualities, noise, blur, contrast):
# one gray with an odd side (coins, 384x303), one colour with an odd side (chelsea, 451x300). The whole set
# (222 pairs up to 1411x1411) takes minutes per run in fp64 with MS-SSIM on two shared cores, and the
# library's own sample-set test (test_presets) already covers every pair of it.
SAMPLE_PHOTOS = ("coins", "chelsea")


@pytest.fixture(scope="module")
def sample_subset(tmp_path_factory) -> Path:
    """A manifest of the sample set's pairs of SAMPLE_PHOTOS, its image paths absolute."""
    manifest = ensure_sample_dataset()
    table = pq.read_table(manifest)
    rows = [r for r in table.to_pylist() if r["image"] in SAMPLE_PHOTOS]
    for row in rows:
        row["reference"] = os.path.join(os.path.dirname(manifest), row["reference"])
        row["distorted"] = os.path.join(os.path.dirname(manifest), row["distorted"])
    path = tmp_path_factory.mktemp("sample-subset") / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return path


def _run(out: Path, manifest: Path, *overrides: str):
    from ssim_ray.config import register_configs
    from ssim_ray.run import evaluate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        composed = compose("ssim_audit", overrides=[f"output.url={out}", "report.enabled=false", "source=parquet",
                                                    f"source.url={manifest}", *overrides])
    cfg = OmegaConf.to_object(composed)
    outcome = evaluate(cfg, output_url=str(out))
    return cfg, outcome, pq.read_table(out / "ssim.parquet").to_pylist()


def _decode(path: str, color: str) -> np.ndarray:
    with open(path, "rb") as handle:
        return decode_image(handle.read(), name=path, color=color, alpha="drop", max_pixels=10**8).pixels


def _no_nan(rows: list) -> None:
    for row in rows:
        for column in ("ssim", "psnr", "ms_ssim"):
            assert row[column] is None or not math.isnan(row[column]), (row["pair_id"], column)
        for column in ("ssim_per_channel", "psnr_per_channel", "ms_ssim_per_channel"):
            assert not any(math.isnan(v) for v in row[column] or []), (row["pair_id"], column)


@pytest.mark.slow
def test_a_basicsr_run_with_every_metric_reproduces_basicsr_per_pair(local_ray, sample_subset, tmp_path):
    cfg, outcome, rows = _run(tmp_path / "basicsr", sample_subset, "ssim=basicsr", "ssim.crop_border=4",
                              "metrics=[ssim,psnr,ms_ssim]")
    assert outcome.exit_code == 0 and len(rows) == 17 * len(SAMPLE_PHOTOS)
    assert outcome.summary["metric"]["preset"] == "basicsr" and outcome.summary["metric"]["metrics"] == list(ALL)
    worst = {"ssim": 0.0, "psnr": 0.0, "ms_ssim": 0.0}
    for row in rows:
        assert row["status"] == "ok" and row["ms_ssim_undefined"] is None, row["pair_id"]
        ref_bgr = _decode(row["reference"], "rgb")[..., ::-1]
        dist_bgr = _decode(row["distorted"], "rgb")[..., ::-1]
        worst["ssim"] = max(worst["ssim"], abs(row["ssim"] - basicsr_ssim(ref_bgr, dist_bgr, crop_border=4,
                                                                          test_y_channel=True)))
        want = basicsr_psnr(ref_bgr, dist_bgr, crop_border=4, test_y_channel=True)
        worst["psnr"] = max(worst["psnr"], abs(row["psnr"] - want) / want)
        # MS-SSIM on the same cropped, unrounded BasicSR Y: msssim.m's transcription.
        y_ref = basicsr_to_y(ref_bgr[4:-4, 4:-4])[..., 0].astype(np.float64)
        y_dist = basicsr_to_y(dist_bgr[4:-4, 4:-4])[..., 0].astype(np.float64)
        worst["ms_ssim"] = max(worst["ms_ssim"], abs(row["ms_ssim"] - msssim_m(y_ref, y_dist)))
    assert worst["ssim"] <= SSIM_TOL and worst["psnr"] <= PSNR_RTOL and worst["ms_ssim"] <= MS_SSIM_TOL, worst
    _no_nan(rows)
    assert outcome.summary["ms_ssim"]["count"] == len(rows) and outcome.summary["psnr"]["count"] == len(rows)


@pytest.mark.slow
def test_a_skimage_default_run_reproduces_scikit_image_per_pair(local_ray, sample_subset, tmp_path):
    cfg, outcome, rows = _run(tmp_path / "skimage", sample_subset, "ssim=skimage_default")
    assert outcome.exit_code == 0 and len(rows) == 17 * len(SAMPLE_PHOTOS)
    assert outcome.summary["metric"]["metrics"] == ["ssim", "psnr"]
    worst = {"ssim": 0.0, "psnr": 0.0}
    for row in rows:
        x, y = chw(_decode(row["reference"], "rgb")), chw(_decode(row["distorted"], "rgb"))
        worst["ssim"] = max(worst["ssim"], abs(row["ssim"] - structural_similarity(x, y, channel_axis=0)))
        want = peak_signal_noise_ratio(x, y)
        worst["psnr"] = max(worst["psnr"], abs(row["psnr"] - want) / want)
        assert row["ms_ssim"] is None and row["ms_ssim_undefined"] is None  # not chosen: null, not "undefined"
    assert worst["ssim"] <= SSIM_TOL and worst["psnr"] <= PSNR_RTOL, worst
    _no_nan(rows)
