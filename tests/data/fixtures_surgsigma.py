"""A tiny SurgΣ-DB release (annotation JSON in the release layout + raw_data/ media) with every known quirk.

`write_surgsigma_release(root)` writes it and returns the JSON path. `EXPECTED` says what a correct loader
makes of each record; tests compare against it, so a new quirk record must be added to both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data.test_media import write_counter_video

# On disk under raw_data/ (the media use zero-padded VID02 folders, like the real CholecT50 frames).
FRAMES_ON_DISK = ("CholecT50/videos/VID02/000509.png", "CholecT50/videos/VID02/000510.png",
                  "CholecT50/videos/VID04/000001.png", "CholecT50/videos/VID4/000001.png")
VIDEO_ON_DISK = "Cholec80/videos/vid12.mp4"

THINKING = ("Level 1: a hook and a grasper; the gallbladder is exposed. Level 2: the grasper retracts the "
            "gallbladder while the hook dissects it from the liver bed. Level 3: the ClippingCutting phase is over; "
            "this is gallbladder dissection.")

RELEASE = {
    "video_list": [  # the real top-level key of this table is unknown: found by content
        {"id": "v_ok", "source dataset": "Cholec80", "source url": "http://camma.u-strasbg.fr/datasets",
         "clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy", "video path": VIDEO_ON_DISK},
        # quirk 4: not a video of public Cholec80 (which has 80), so it is not on disk
        {"id": "v_not_public", "source dataset": "Cholec80", "source url": "http://camma.u-strasbg.fr/datasets",
         "clinical specialty": "Hepatobiliary", "surgical type": "Cholecystectomy",
         "video path": "Cholec80/videos/vid92.mp4", "fps": 25},  # unknown table field
    ],
    "images": [
        {"id": "img_vid2", "image path": "CholecT50/videos/VID2/000509.png"},  # quirk 1: repairable (VID02 exists)
        {"id": "img_vid02", "image path": "CholecT50/videos/VID02/000510.png"},
        {"id": "img_vid6", "image path": "CholecT50/videos/VID6/000001.png"},  # quirk 1: VID06 absent too
        {"id": "img_vid4", "image path": "CholecT50/videos/VID4/000001.png"},  # unpadded exists: kept as is
    ],
    "annos": [
        {"id": "phase", "images": ["img_vid2"], "task type": [5], "question": "Which phase is shown?",
         "answer": "The reflected phase is Gallbladder Dissection.", "thinking": THINKING,
         "difficulty": "easy"},  # unknown extra field
        {"id": "instruments", "images": ["img_vid02"], "task type": [2], "question": "Which tools are visible?",
         "answer": "They belong to the categories Grasper, Hook."},
        # quirk 5: localization appears as [1]; quirk 2: both box conventions
        {"id": "loc_grid", "images": ["img_vid02"], "task type": [1], "question": "Locate the tools.",
         "answer": "hook (369,0),(877,567)"},
        {"id": "loc_unit", "images": ["img_vid02"], "task type": [4], "question": "Locate the gallbladder.",
         "answer": "gallbladder [0.282, 0.452, 0.447, 0.752]"},
        {"id": "loc_none", "images": ["img_vid4"], "task type": [1], "question": "Locate the tools.",
         "answer": "No tools detected."},
        # quirk 3: Qwen special tokens, one well-formed, one with a word spliced into a coordinate
        {"id": "tokens_ok", "images": ["img_vid02"], "task type": [1], "question": "Locate the hook.",
         "answer": "<|object_ref_start|>hook<|object_ref_end|><|box_start|>(369,0),(877,567)<|box_end|>"},
        {"id": "tokens_corrupt", "images": ["img_vid02"], "task type": [1], "question": "Locate the grasper.",
         "answer": "<|object_ref_start|>grasper<|object_ref_end|><|box_start|>(3gallbladder69,0),(877,567)"
                   "<|box_end|>"},
        {"id": "missing_frame", "images": ["img_vid6"], "task type": [5], "question": "Which phase?",
         "answer": "The reflected phase is Preparation."},
        {"id": "action", "images": ["v_ok"], "task type": [8], "question": "Which action is performed?",
         "answer": "clipping"},
        {"id": "caption_not_public", "images": ["v_not_public"], "task type": [13], "question": "Describe the clip.",
         "answer": "The hook dissects, then the grasper retracts the gallbladder."},
        {"id": "triplet", "images": ["img_vid02"], "task type": [9], "question": "Which triplets?",
         "answer": "The triplet is <grasper, retract, gallbladder>."},
        {"id": "cvs", "images": ["img_vid02"], "task type": [11], "question": "Is the CVS achieved?",
         "answer": "Two structures: no. Hepatocystic triangle: yes. Cystic plate: no."},
        # generation tasks (desmoking, depth, segmentation): excluded with a counted reason
        {"id": "gen_desmoke", "images": ["img_vid02"], "task type": [7], "question": "Remove the smoke.",
         "answer": "dense_prediction/desmoke/000510.png"},
        {"id": "gen_depth", "images": ["img_vid02"], "task type": [10], "question": "Estimate depth.",
         "answer": "dense_prediction/depth/000510.png"},
        {"id": "gen_mask", "images": ["img_vid02"], "task type": [16], "question": "Segment the tools.",
         "answer": "dense_prediction/masks/000510.png"},
        {"id": "unknown_task", "images": ["img_vid02"], "task type": [42], "question": "?", "answer": "x"},
        {"id": "no_question", "images": ["img_vid02"], "task type": [5],
         "answer": "The reflected phase is Preparation."},
    ],
    "version": "0.1",  # unknown top-level key
}

EXPECTED = {
    "samples": ["phase", "instruments", "loc_grid", "loc_unit", "loc_none", "tokens_ok", "action", "triplet", "cvs"],
    "excluded": {"desmoking": 1, "depth_estimation": 1, "instrument_segmentation": 1},
    # record id -> a phrase its reason must contain
    "bad": {"tokens_corrupt": "quarantined", "missing_frame": "media not found",
            "caption_not_public": "media not found", "unknown_task": "unknown task id 42",
            "no_question": "no question field"},
    "repaired": 1,
    "missing_media": {"CholecT50/videos/VID6/000001.png": 1, "Cholec80/videos/vid92.mp4": 1},
    "unmapped": {"difficulty": 1, "top-level 'version'": 1, "'video_list' entry field 'fps'": 1},
}


def write_surgsigma_release(root: Path) -> Path:
    """Write the release JSON to root/SurgSigma_fixture.json and its media under root/raw_data/."""
    rng = np.random.default_rng(0)
    for rel in FRAMES_ON_DISK:
        path = root / "raw_data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    video = root / "raw_data" / VIDEO_ON_DISK
    video.parent.mkdir(parents=True, exist_ok=True)
    write_counter_video(video, num_frames=8)
    path = root / "SurgSigma_fixture.json"
    path.write_text(json.dumps(RELEASE, indent=1))
    return path
