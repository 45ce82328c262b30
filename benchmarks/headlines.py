"""The numbers a reader of the benchmark report wants first, picked out of each part's report.

One function per part turns its report into rows ``(what, value)``; a part that did not run (or failed) has no rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rows = list[tuple[str, str]]


def latency_rows(report: dict[str, Any]) -> Rows:
    rows = []
    for case in report["cases"]:
        runtimes = case["runtimes"]
        ratios = ", ".join(
            f"{name} {row['speedup']:.2f}x vs {row['speedup_vs']}" for name, row in runtimes.items() if "speedup" in row
        )
        fastest = min(runtimes, key=lambda name: runtimes[name]["p50_ms"])
        rows.append(
            (
                f"speed-ups, {case['preset']} {case['input']} ({case['gflops']:.1f} GFLOPs per image), batch 1",
                f"{ratios}; fastest {fastest} {runtimes[fastest]['p50_ms']:.0f} ms p50",
            )
        )
    accuracy = report["accuracy"]
    changes = ", ".join(
        f"{name} {100 * row['AP']:.1f} ({100 * row['AP_change']:+.1f})" for name, row in accuracy["mask"].items()
    )
    rows.append((f"mask AP by runtime, trained tiny model, {accuracy['val_images']} val images", changes))
    rows += [(f"{name}", "not measured: unsupported (see the latency part)") for name in report["unsupported"]]
    return rows


def real_size_rows(report: dict[str, Any]) -> Rows:
    rows = []
    for preset in report["presets"]:
        runtimes = preset["runtimes"]
        speeds = ", ".join(
            f"{name} {row['batch4']['images_per_s']:.2f} ({row['batch4']['speedup']:.2f}x)"
            for name, row in runtimes.items()
        )
        verdicts = (
            f"parity {'PASS' if preset['parity']['passed'] else 'FAIL'}, "
            f"served = predicted {'PASS' if preset['serving']['passed'] else 'FAIL'}"
        )
        rows.append((f"{preset['preset']} at {preset['canvas']}, images/s at batch 4 (vs pytorch_fp32)", speeds))
        rows.append((f"{preset['preset']} at {preset['canvas']}: exported graph checked", verdicts))
    return rows


def imaging_rows(report: dict[str, Any]) -> Rows:
    image, medians = report["image"], report["median_ms"]
    return [
        (
            f"decode + test resize of a {image['megapixels']:g}-megapixel JPEG, project vs Pillow",
            f"{report['ratio_to_pillow']['project']:.2f}x Pillow's time ({medians['project']:.0f} vs "
            f"{medians['pillow']:.0f} ms median)",
        )
    ]


def serving_rows(report: dict[str, Any]) -> Rows:
    return [
        (
            f"Triton gRPC overhead vs in-process ORT, batch 1, {path.removeprefix('triton_')} (target <= 15%)",
            f"{100 * row['overhead']:+.1f} % of the p50 ({report['input']}, {report['model']})",
        )
        for path, row in report["overhead"].items()
    ]


def sweep_rows(report: dict[str, Any]) -> Rows:
    rows = []
    for case in report["cases"]:
        best = max(case["points"], key=lambda point: point["images_per_s"])
        errors = sum(point["error_count"] for point in case["points"])
        rows.append(
            (
                f"Triton gRPC throughput, {case['case']} (concurrency 1..8, shared memory off/on)",
                f"best {best['images_per_s']:.1f} images/s at concurrency {best['concurrency']} "
                f"(shm {'on' if best['shared_memory'] else 'off'}, p99 {best['latency']['p99_ms']:.0f} ms); "
                f"{errors} errors",
            )
        )
    return rows


def serving_reliability_rows(report: dict[str, Any]) -> Rows:
    soak, kill = report["soak"], report["kill"]
    return [
        (
            f"soak: {soak['clients']} clients for {soak['duration_s']:.0f} s",
            f"{soak['ok']} requests, {soak['errors']} errors, p99 {soak['latency_shm_off']['p99_ms']:.0f} ms, "
            f"server memory {soak['server_rss_growth_mb']:+.1f} MB ({soak['server_rss_growth_percent']:+.1f} %)",
        ),
        (
            "server SIGKILLed under load, then `freesolo serve start`",
            f"first client error after {kill['first_error_after_kill_ms']:.0f} ms, all UNAVAILABLE: "
            f"{kill['all_failures_unavailable']}; back in {kill['restart_s']:.1f} s with the same detections: "
            f"{kill['same_detections_after_restart']}",
        ),
    ]


def nms_rows(report: dict[str, Any]) -> Rows:
    ratios, ap = report["ratios"], report["ap"]
    by_name = {variant["name"]: variant for variant in ap["variants"]}
    gain = 100 * (by_name["matrix_gaussian"]["AP"] - by_name["greedy"]["AP"])
    return [
        (
            f"Matrix NMS vs greedy mask NMS at N = {ratios['n']} (paper: {ratios['paper_greedy_over_matrix']:g}x)",
            f"{ratios['greedy_over_matrix']:.2f}x whole calls (IoU matrix included), "
            f"{ratios['greedy_walk_over_matrix_decay']:.2f}x decay step vs greedy walk",
        ),
        (
            f"Matrix NMS decay step alone at N = {ratios['n']} "
            f"(paper: < {ratios['paper_matrix_500_ms']:g} ms on a GPU)",
            f"{ratios['matrix_decay_p50_ms']:.1f} ms p50 on the CPU",
        ),
        (
            f"mask AP, Matrix NMS vs greedy (paper: +{100 * ap['paper_AP_gain']:.1f})",
            f"{100 * by_name['matrix_gaussian']['AP']:.1f} vs {100 * by_name['greedy']['AP']:.1f} ({gain:+.1f}), "
            f"{ap['images']} val images",
        ),
    ]


def training_reliability_rows(report: dict[str, Any]) -> Rows:
    training, freemask = report["training"], report["freemask"]
    kills = ", ".join(str(kill["iterations_done_at_kill"]) for kill in training["kills"])
    return [
        (
            f"training SIGKILLed at iteration(s) {kills} of {training['iters']}, resumed",
            f"max abs weight difference {training['max_abs_weight_difference']:.1e} vs an uninterrupted run "
            f"({'pass' if training['passed'] else 'FAIL'})",
        ),
        (
            f"Free Mask SIGKILLed after {freemask['images_done_at_kill']} of {freemask['images_total']} images, rerun",
            f"{freemask['duplicate_images']} duplicate, {freemask['missing_images']} missing images; output "
            f"{'identical to' if freemask['identical'] else 'differs from'} an uninterrupted run",
        ),
    ]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Rows]] = {
    "latency": latency_rows,
    "real_size": real_size_rows,
    "imaging": imaging_rows,
    "serving": serving_rows,
    "sweep": sweep_rows,
    "serving_reliability": serving_reliability_rows,
    "nms": nms_rows,
    "training_reliability": training_reliability_rows,
}


def headline_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Rows {what, value, part} for the parts that finished, in the order of the parts."""
    return [
        {"what": what, "value": value, "part": name}
        for name, report in reports.items()
        if name in EXTRACTORS
        for what, value in EXTRACTORS[name](report)
    ]
