"""The 18 SurgΣ-DB tasks: what a text VLM trainer can train on, and what it must exclude."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Group = Literal["understanding", "reasoning", "planning", "generation"]


@dataclass(frozen=True)
class Task:
    name: str
    group: Group
    modality: Literal["image", "video"]
    answer_kind: str

    @property
    def trainable(self) -> bool:
        """Generation tasks need an image/video generator; a text VLM cannot learn them."""
        return self.group != "generation"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("instrument_recognition", "understanding", "image", "label_list"),
        Task("instrument_localization", "understanding", "image", "boxes_0_1000"),
        Task("tissue_recognition", "understanding", "image", "label_list"),
        Task("tissue_localization", "understanding", "image", "boxes_unit"),
        Task("phase_recognition", "understanding", "image", "label"),
        Task("step_recognition", "understanding", "image", "label"),
        Task("action_recognition", "understanding", "video", "label"),
        Task("triplet_recognition", "understanding", "image", "triplets"),
        Task("safety_assessment", "reasoning", "image", "cvs_criteria"),
        Task("image_captioning", "understanding", "image", "free_text"),
        Task("video_captioning", "understanding", "video", "free_text"),
        Task("action_remaining_time", "planning", "video", "seconds"),
        Task("next_action_planning", "planning", "video", "label"),
        Task("desmoking", "generation", "image", "image"),
        Task("instrument_segmentation", "generation", "image", "mask"),
        Task("depth_estimation", "generation", "image", "depth_map"),
        Task("next_frame_prediction", "generation", "image", "image"),
        Task("conditional_video_generation", "generation", "video", "video"),
    )
}


def get_task(name: str) -> Task | None:
    return TASKS.get(name)
