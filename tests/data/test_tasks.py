"""The 18-task registry, its label vocabularies and label mention matching."""

from collections import Counter

import pytest

from surgsigma_train.config.schema import DEFAULT_TASK_IDS
from surgsigma_train.data.tasks import TASKS, VOCABULARIES, get_task, mentioned_labels, task_vocabularies, vocabulary


def test_registry_covers_the_18_tasks():
    assert len(TASKS) == 18 and set(DEFAULT_TASK_IDS.values()) == set(TASKS)
    assert Counter(t.group for t in TASKS.values()) == {"understanding": 10, "reasoning": 1, "planning": 2,
                                                        "generation": 5}
    assert [t.name for t in TASKS.values() if not t.trainable] == [
        "desmoking", "instrument_segmentation", "depth_estimation", "next_frame_prediction",
        "conditional_video_generation"]
    assert get_task("action_remaining_time").modality == "video" and get_task("nope") is None
    for task in TASKS.values():
        assert all(v in VOCABULARIES for v in task.vocabularies), task.name


def test_vocabularies():
    sizes = {name: len(labels) for name, labels in VOCABULARIES.items()}
    assert sizes == {"cholec80_phases": 7, "cholec80_tools": 7, "cholect50_instruments": 6, "cholect50_verbs": 10,
                     "cholect50_targets": 15, "basic_actions": 10, "cvs_criteria": 3}
    assert vocabulary("cholect50_verbs")[-1] == "null_verb" and vocabulary("cholect50_targets")[-1] == "null_target"
    assert "CalotTriangleDissection" in vocabulary("cholec80_phases")
    assert list(task_vocabularies("triplet_recognition")) == ["cholect50_instruments", "cholect50_verbs",
                                                              "cholect50_targets"]
    assert task_vocabularies("image_captioning") == {} and task_vocabularies("nope") == {}
    with pytest.raises(KeyError, match="no vocabulary 'phases'"):
        vocabulary("phases")


@pytest.mark.parametrize("answer, vocab, expected", [
    ("The reflected phase is Gallbladder Dissection.", "cholec80_phases", ["GallbladderDissection"]),
    ("calot_triangle_dissection, then CLIPPING CUTTING", "cholec80_phases",
     ["CalotTriangleDissection", "ClippingCutting"]),
    ("They belong to the categories Hook, Grasper and specimen bag.", "cholec80_tools",
     ["Hook", "Grasper", "SpecimenBag"]),
    ("<grasper, null verb, null-target>", "cholect50_verbs", ["null_verb"]),
    ("<grasper, null verb, null-target>", "cholect50_targets", ["null_target"]),
    ("The grasper is clipping.", "cholect50_verbs", []),  # "grasper"/"clipping" are not the verbs grasp/clip
    ("Knot tying, after needle-grasping.", "basic_actions", ["knot-tying", "needle grasping"]),
    ("No phase.", "cholec80_phases", []),
])
def test_mentioned_labels(answer, vocab, expected):
    assert mentioned_labels(answer, VOCABULARIES[vocab]) == expected
