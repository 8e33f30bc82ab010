"""The ``image-folder`` dataset: class subfolders, ``labels.jsonl`` and ``captions.jsonl``; the
held-out split it picks; the class order a checkpoint keeps; one-line errors. And a model that
writes no ``evaluate`` of its own: trained through the real trainer, it gets the loss-only one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from PIL import Image

from isthmus import DataSplits, Model, ModelSpec, ParamSpec, Scope, hookimpl, layers
from isthmus.data import DataError
from isthmus.data.image_folder import held_out, image_folder
from isthmus.registry.manager import load_plugins
from isthmus.train.run import ModelContractError, compose_run, prepare
from isthmus.train.trainer import Trainer


def picture(path: Path, colour: tuple[int, int, int], size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def class_folders(root: Path, counts: Mapping[str, int]) -> Path:
    for index, (name, count) in enumerate(counts.items()):
        for i in range(count):
            picture(root / name / f"{i}.png", (40 * index, 200, 255 - 40 * index))
    return root


def test_class_subfolders_give_labelled_batches_and_a_split_from_every_class(tmp_path):
    root = class_folders(tmp_path, {"dog": 12, "cat": 20, "ant": 5})
    data = image_folder({"path": str(root), "image_size": 8, "seed": 0})
    assert data.classes == ("ant", "cat", "dog")  # sorted names; label i is classes[i]
    assert data.tokenizer is None
    batch = data.train.batch([0, 1])
    assert batch["images"].dtype == np.float32 and batch["images"].shape == (2, 3, 8, 8)
    assert batch["labels"].dtype == np.int64
    assert float(batch["images"].min()) >= -1.0 and float(batch["images"].max()) <= 1.0
    held = np.bincount(data.eval.labels, minlength=3).tolist()
    assert held == [1, 2, 1]  # 10% of each class, at least one
    assert len(data.train) + len(data.eval) == 37


def test_labels_jsonl_with_integer_labels_keeps_their_numeric_order(tmp_path):
    lines = []
    for i in range(24):
        label = [2, 10, 1][i % 3]
        picture(tmp_path / "img" / f"{i}.png", (label * 20, 0, 0))
        lines.append(json.dumps({"image": f"img/{i}.png", "label": label}))
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    data = image_folder({"path": str(tmp_path), "image_size": 8, "num_eval": 6})
    assert data.classes == ("1", "2", "10")
    assert len(data.eval) == 6 and sorted(np.bincount(data.eval.labels).tolist()) == [2, 2, 2]


def test_a_checkpoints_class_order_is_kept_and_a_new_class_refused(tmp_path):
    root = class_folders(tmp_path, {"a": 4, "b": 4})
    data = image_folder({"path": str(root), "image_size": 8}, {"classes": ["b", "a"]})
    assert data.classes == ("b", "a")
    assert data.train.batch([0])["labels"][0] in (0, 1)
    with pytest.raises(DataError, match="class 'b' is not one the model was trained on"):
        image_folder({"path": str(root), "image_size": 8}, {"classes": ["a", "c"]})


@pytest.mark.parametrize("setup, expected", [
    (lambda root: None, "no captions.jsonl, no labels.jsonl and no class subfolders"),
    (lambda root: class_folders(root, {"only": 5}), "at least two classes"),
    (lambda root: (root / "labels.jsonl").write_text('{"image": "x.png", "label": "a"}\n{"image": "y.png", "label": "b"}\n'),
     "image not found"),
    (lambda root: (root / "labels.jsonl").write_text('{"image": "x.png", "label": [1]}\n'), "'label' must be"),
    (lambda root: (root / "labels.jsonl").write_text("not json\n"), "not valid JSON"),
])
def test_bad_folders_are_one_line_errors_naming_the_place(tmp_path, setup, expected):
    setup(tmp_path)
    with pytest.raises(DataError, match=expected) as caught:
        image_folder({"path": str(tmp_path), "image_size": 8})
    assert "\n" not in str(caught.value)


def test_the_held_out_split_needs_room_in_every_class():
    labels = np.array([0, 0, 0, 1, 1])
    train, evaluation = held_out(labels, None, 0.1, seed=0)
    assert sorted(np.bincount(labels[evaluation]).tolist()) == [1, 1] and len(train) == 3
    with pytest.raises(DataError, match="would leave a class without training samples"):
        held_out(labels, 4, 0.1, seed=0)


def test_the_split_is_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    first, again = held_out(labels, None, 0.2, seed=5), held_out(labels, None, 0.2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not set(first[0]) & set(first[1])
    assert not np.array_equal(first[1], held_out(labels, None, 0.2, seed=6)[1])


# ---- a model with no evaluate of its own --------------------------------------------------------


class MeanColour(Model):
    """Logits from the mean colour of an image: a linear layer, nothing else."""

    name = "mean-colour"

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def param_specs(self) -> dict[str, ParamSpec]:
        return {f"head.{k}": v for k, v in layers.linear_specs(3, self.classes).items()}

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        return layers.linear(k, Scope(params).sub("head"), k.mean(batch["images"], axis=(2, 3)))

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = True) -> Any:
        return k.cross_entropy(self.forward(k, params, batch), batch["labels"]), {}


class MeanColourPlugin:
    @staticmethod
    @hookimpl
    def register_models(register: Any) -> None:
        register(ModelSpec(name="mean-colour", factory=lambda config, data: MeanColour(len(data.classes))))


class NotAModelPlugin:
    @staticmethod
    @hookimpl
    def register_models(register: Any) -> None:
        register(ModelSpec(name="not-a-model", factory=lambda config, data: object()))


def test_a_model_without_evaluate_trains_and_gets_the_loss_only_evaluation(tmp_path):
    root = class_folders(tmp_path / "images", {"red": 16, "blue": 16})
    manager, registry = load_plugins(autoload=False, extra=[("mean-colour", MeanColourPlugin)])
    cfg = compose_run(registry, ["model.name=mean-colour", "data=image-folder",
                                 f"data.path={root}", "data.image_size=8", "backend=cpu", "train.steps=6",
                                 "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=3",
                                 f"output_dir={tmp_path / 'run'}"])
    run = prepare(cfg, registry)
    assert isinstance(run.data, DataSplits) and run.data.classes == ("blue", "red")
    result = Trainer(run, tmp_path / "run", manager).fit()
    assert set(result.evaluation) >= {"eval_loss", "samples", "headline"}
    assert result.evaluation["samples"] == len(run.data.eval) and np.isfinite(result.evaluation["eval_loss"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["split"] == "eval"] == [3, 6]


def test_a_factory_that_returns_no_model_is_named_in_one_line(tmp_path):
    root = class_folders(tmp_path / "images", {"red": 4, "blue": 4})
    _, registry = load_plugins(autoload=False, extra=[("not-a-model", NotAModelPlugin)])
    cfg = compose_run(registry, ["model.name=not-a-model", "data=image-folder", f"data.path={root}", "backend=cpu"])
    with pytest.raises(ModelContractError, match="model 'not-a-model' .* returned object, which does not derive from "
                                                 "isthmus.Model"):
        prepare(cfg, registry)
