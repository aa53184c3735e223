"""Golden kind `emo_split`: the per-latent-frame split of expression tokens (`models/emo_split.py`).

Every entry of the case's `cases` is run on its own input `input/x_<name>`; ranges, context lengths
and the split tensor must be exactly equal. `errors_for_small_F` lists frame counts the reference
cannot split: ours must raise `EmotionSplitError` for each.
"""

from __future__ import annotations

from flashportrait.golden import Comparison, GoldenCase, compare_exact, failure
from flashportrait.models.emo_split import EmotionSplitError, plan_emotion_split, split_emotion_tokens


def run(case: GoldenCase) -> list[Comparison]:
    results: list[Comparison] = []
    for name, spec in case.meta["cases"].items():
        x = case.tensor(f"input/x_{name}")
        frames = int(spec["num_emo_frames"])
        expand = int(spec.get("expand_length", 0))
        plan = plan_emotion_split(x.shape[1], frames, expand)
        chunks, lens = split_emotion_tokens(x, frames, expand_length=expand, plan=plan)
        results += [
            compare_exact(f"{name}/pos_idx_range", [list(r) for r in plan.ranges], spec["pos_idx_range"]),
            compare_exact(f"{name}/context_lens", lens, case.tensor(f"output/context_lens_{name}")),
            compare_exact(f"{name}/sub", chunks, case.tensor(f"output/sub_{name}")),
        ]
    tokens_per_frame = int(case.config.get("tokens_per_frame", 24))
    for frames_text in case.meta.get("errors_for_small_F", {}):
        frames = int(frames_text)
        try:
            plan_emotion_split(frames * tokens_per_frame, frames)
        except EmotionSplitError:
            results.append(compare_exact(f"F{frames}/error", True, True))
        else:
            message = "the reference fails on this frame count; ours did not raise"
            results.append(failure(f"F{frames}/error", message))
    return results
