"""Golden kind `context_windows`: the window plan, frame-count and image-size rounding.

Every case of the golden table is checked twice:

1. the REFERENCE behaviour, failures included (`reference_windows`, the blend bookkeeping of each
   consecutive pair, the per-window feature slice and its expression-chunk count), field by field;
2. OUR plan (`plan_windows`): where the reference is defined and correct (it runs, its windows have no
   duplicates, the blend pairs are aligned and every feature slice yields one chunk per latent frame)
   our plan must be exactly the reference's; everywhere else our defined short-video plan (one window of
   the first C latent frames, driving features held at the last frame) or, with fewer than 2 latent
   frames, a clear error must be used, and nowhere else.

The frame-count table is checked against the reference rules and against `frame_counts` (a driving
video with no output frame left is an error), the image-size table against `scaled_image_size`.
"""

from __future__ import annotations

import itertools
from typing import Any

from flashportrait.golden import Comparison, GoldenCase, compare_exact
from flashportrait.sampling.windows import (
    FRAMES_PER_LATENT,
    blend_weights,
    emo_positions,
    find_replacement,
    frame_counts,
    latent_length_for,
    pipeline_num_frames,
    plan_windows,
    reference_context_step,
    reference_emo_slice,
    reference_raw_windows,
    reference_windows,
    scaled_image_size,
)

_INDEX_ERROR = "IndexError: list index out of range"


def run(case: GoldenCase) -> list[Comparison]:
    meta = case.meta
    comparisons = []
    for entry in meta["cases"]:
        comparisons += _window_case(entry)
    comparisons.append(_frame_rounding(meta["frame_rounding"]))
    comparisons.append(_image_sizes(meta["image_size_rounding"]))
    return comparisons


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _reference_case(n: int, c: int, o: int) -> dict[str, Any]:
    """The golden's fields for one (N, C, O), computed from our reproduction of the reference."""
    ours: dict[str, Any] = {
        "context_step": reference_context_step(n, c),
        "context_scheduler_raw_last_window": reference_raw_windows(n, c, o)[-1],
    }
    try:
        windows = reference_windows(n, c, o)
    except ValueError as exc:
        ours["error"] = _error_text(exc)
        return ours
    ours["error"] = None
    ours["windows"] = windows
    ours["window_has_duplicates"] = [len(set(w)) != len(w) for w in windows]
    ours["covers_all_frames"] = set().union(*map(set, windows)) == set(range(n))
    ours["pairs"] = [_reference_pair(prev, cur, c) for prev, cur in itertools.pairwise(windows)]
    ours["emo_slices"] = [_reference_emo_slice(w, c) for w in windows]
    ours["pipeline_runs_without_exception"] = all(
        e["error"] is None for e in ours["emo_slices"] + ours["pairs"]
    )
    ours["emo_positions_match_windows"] = all(e["matches_window_length"] for e in ours["emo_slices"])
    return ours


def _reference_pair(prev: list[int], cur: list[int], c: int) -> dict[str, Any]:
    overlap = len(set(cur) & set(prev))
    cur_positions = [i % c for i in range(overlap)]
    prev_positions = list(range(c - overlap, c))
    cur_frames = [cur[p] for p in cur_positions]
    prev_frames = [prev[p] for p in prev_positions]
    try:
        weights, error = blend_weights(overlap).tolist(), None
    except ZeroDivisionError as exc:
        weights, error = None, _error_text(exc)
    return {
        "overlap_len": overlap,
        "cur_window_positions": cur_positions,
        "cur_global_frames": cur_frames,
        "prev_window_positions": prev_positions,
        "prev_global_frames": prev_frames,
        "aligned": cur_frames == prev_frames,
        "weights_for_current": weights,
        "error": error,
    }


def _reference_emo_slice(window: list[int], c: int) -> dict[str, Any]:
    start, end = reference_emo_slice(window)
    num = end - start  # the reference's own count, not the length of the (possibly clipped) slice
    positions = emo_positions(num)
    ok = positions >= 2  # split_audio_adapter_sequence indexes the second position
    return {
        "start_index": start,
        "end_index": end,
        "num_emo_frames": num,
        "num_emo_positions": positions if ok else None,
        "matches_window_length": ok and positions == c,
        "error": None if ok else _INDEX_ERROR,
    }


def _window_case(entry: dict[str, Any]) -> list[Comparison]:
    n, c, o = entry["latent_length"], entry["context_size"], entry["context_overlap"]
    tag = f"N={n},C={c},O={o}"
    ours = _reference_case(n, c, o)
    golden = {key: entry[key] for key in ours if key in entry}
    missing = sorted(set(ours) ^ (set(entry) - {"latent_length", "context_size", "context_overlap"}))
    result = [compare_exact(f"reference[{tag}]", ours, golden)]
    if missing:
        result.append(compare_exact(f"reference_fields[{tag}]", sorted(ours), sorted(golden)))

    reference_ok = (
        entry["error"] is None
        and entry["pipeline_runs_without_exception"]
        and entry["emo_positions_match_windows"]
        and not any(entry["window_has_duplicates"])
        and all(pair["aligned"] for pair in entry["pairs"])
    )
    result.append(compare_exact(f"plan[{tag}]", _our_plan(n, c, o), _expected_plan(entry, reference_ok)))
    return result


def _our_plan(n: int, c: int, o: int) -> dict[str, Any]:
    try:
        plan = plan_windows(n, c, o)
    except ValueError as exc:
        return {"refused": type(exc).__name__}
    return {
        "short_video": plan.short_video,
        "windows": plan.windows(),
        "generated_length": plan.generated_length,
        "overlaps": list(plan.overlaps[1:]),
        "weights": [plan.blend_weights(w).tolist() for w in range(1, plan.num_windows)],
        "features": [plan.feature_frames(w) for w in range(plan.num_windows)],
    }


def _expected_plan(entry: dict[str, Any], reference_ok: bool) -> dict[str, Any]:
    n, c = entry["latent_length"], entry["context_size"]
    if reference_ok:
        return {
            "short_video": False,
            "windows": entry["windows"],
            "generated_length": n,
            "overlaps": [pair["overlap_len"] for pair in entry["pairs"]],
            "weights": [pair["weights_for_current"] for pair in entry["pairs"]],
            "features": [list(range(s["start_index"], s["end_index"])) for s in entry["emo_slices"]],
        }
    if n < 2:
        return {"refused": "ValueError"}
    last = (n - 1) * FRAMES_PER_LATENT
    return {
        "short_video": True,
        "windows": [list(range(c))],
        "generated_length": c,
        "overlaps": [],
        "weights": [],
        "features": [[min(i, last) for i in range((c - 1) * FRAMES_PER_LATENT + 1)]],
    }


def _frame_rounding(rows: list[dict[str, Any]]) -> Comparison:
    ours, golden = [], []
    for row in rows:
        video = row["video_frames"]
        n = find_replacement(video)
        latent = latent_length_for(n) if n >= 1 else None
        mine = {
            "video_frames": video,
            "find_replacement": n,
            "pipeline_num_frames_after_%4_rounding": pipeline_num_frames(n),
            "latent_frames": latent,
            "frames_written_after_drop_first": n - 1 if latent is not None else None,
        }
        try:
            counts = frame_counts(video)
            mine["ours"] = [counts.num_frames, counts.latent_length, counts.output_frames]
        except ValueError:
            mine["ours"] = "refused"
        ours.append(mine)
        # Ours must agree with the reference whenever it writes at least one frame, else refuse.
        written = row["frames_written_after_drop_first"]
        expected_ours = [row["find_replacement"], row["latent_frames"], written] if written else "refused"
        golden.append({**{k: row[k] for k in mine if k != "ours"}, "ours": expected_ours})
    return compare_exact("frame_rounding", ours, golden)


def _image_sizes(rows: list[dict[str, Any]]) -> Comparison:
    ours, golden = [], []
    for row in rows:
        width, height = row["input_wh"]
        max_size = row["max_size"]
        final_w, final_h = scaled_image_size(width, height, max_size)
        scale = max_size / max(width, height)
        ours.append(
            {
                "scale": scale,
                "scaled_wh_int": [int(width * scale), int(height * scale)],
                "final_wh": [final_w, final_h],
                "latent_hw": [final_h // 8, final_w // 8],
                "tokens_per_latent_frame": (final_h // 16) * (final_w // 16),
            }
        )
        golden.append({key: row[key] for key in ours[-1]})
    return compare_exact("image_size_rounding", ours, golden)
