"""sksegcal.datasets.load_demo_logits: the demo's logits and labels as arrays."""

import numpy as np
import pytest

pytest.importorskip("nilearn")


def test_demo_logits_are_the_shipped_networks_on_the_demo_data():
    from sksegcal.datasets import load_dataset, load_demo_logits

    logits, labels, groups, class_names = load_demo_logits(quick=True)
    assert logits.dtype == np.float32 and logits.shape[1] == len(class_names) == 3
    assert logits.shape[0] == labels.shape[0] == groups.shape[0]
    assert logits.shape[2:] == labels.shape[1:]
    # the same images as the dataset's calibration subset, with their slice ids
    from sksegcal._segnet import DEMO_SETTINGS

    data = load_dataset(random_state=0, **DEMO_SETTINGS[("mni152-tissue", True)]["data"])
    part = data.select("calibration")
    np.testing.assert_array_equal(labels, part.labels)
    np.testing.assert_array_equal(groups, part.slice_index)
    # a trained network, not random weights: most held-out pixels are right
    assert (logits.argmax(axis=1) == labels).mean() > 0.8
    with pytest.raises(ValueError, match="subset must be"):
        load_demo_logits(subset="test")
