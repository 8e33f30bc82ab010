"""Data: scenes and captions, tokenizer, splits, batches, resumable iteration, user folders."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import isthmus.data as data
from isthmus.data import (
    COLOURS,
    IGNORE_INDEX,
    PAD,
    RELATIONS,
    SHAPES,
    UNK,
    WORDS,
    Caption,
    DataError,
    Scene,
    Shape,
    Tokenizer,
    caption_matches,
    generate_scenes,
    make_dataset,
    parse_caption,
    render_scenes,
)
from isthmus.errors import IsthmusError

SMALL = {"num_train": 600, "num_eval": 100, "seed": 7}


@pytest.fixture(scope="module")
def scenes():
    return make_dataset(SMALL)


def test_public_names():
    assert sorted(data.__all__) == sorted([
        "BOS", "CAPTIONS_FILE", "COLOURS", "DATA_DEFAULTS", "EOS", "IGNORE_INDEX", "PAD", "RELATIONS", "SHAPES",
        "SPECIAL_TOKENS", "UNK", "WORDS", "Batch", "BatchIterator", "Batches", "DataSplits", "Dataset", "Caption", "CaptionDataset", "DataError",
        "FolderData", "Scene", "Shape", "Tokenizer", "canonical", "caption_matches", "generate_scenes",
        "load_folder", "load_image", "make_dataset", "normalise_pixels", "parse_caption", "relation_between", "render_scenes",
        "split_indices", "split_words",
    ])
    assert issubclass(DataError, IsthmusError)


# ---- determinism and splits ----------------------------------------------------------------------


def test_same_seed_same_arrays_and_other_seed_differs(scenes):
    train, evaluation, tokenizer = scenes
    again_train, again_eval, again_tokenizer = make_dataset(SMALL)
    assert tokenizer == again_tokenizer
    for a, b in ((train, again_train), (evaluation, again_eval)):
        assert a.images.tobytes() == b.images.tobytes()
        assert np.array_equal(a.tokens, b.tokens) and a.captions == b.captions
    other, _, _ = make_dataset({**SMALL, "seed": 8})
    assert not np.array_equal(other.images, train.images)
    assert other.captions != train.captions


def test_more_samples_keep_the_first_ones_and_eval_does_not_depend_on_train_size(scenes):
    train, evaluation, _ = scenes
    bigger_train, same_eval, _ = make_dataset({**SMALL, "num_train": 1500})
    assert np.array_equal(bigger_train.images[: len(train)], train.images)
    assert same_eval.captions == evaluation.captions
    assert np.array_equal(same_eval.images, evaluation.images)


def test_splits_share_no_image(scenes):
    train, evaluation, _ = scenes
    assert (len(train), len(evaluation)) == (600, 100)
    train_images = {image.tobytes() for image in train.images}
    assert not any(image.tobytes() in train_images for image in evaluation.images)


def test_image_size_is_configurable():
    train, _, _ = make_dataset({"num_train": 8, "num_eval": 2, "image_size": 48})
    assert train.batch([0, 1])["images"].shape == (2, 3, 48, 48)


# ---- captions follow from the image -------------------------------------------------------------


def shape_masks(scene: Scene, image_size: int) -> list[np.ndarray]:
    """Pixels of each shape alone."""
    return [render_scenes([Scene((shape,))], image_size)[0].any(axis=-1) for shape in scene.shapes]


def relation_in_pixels(first: np.ndarray, second: np.ndarray) -> str | None:
    """The relation a viewer sees: apart along one axis, overlapping along the other."""
    rows_a, cols_a = np.nonzero(first)
    rows_b, cols_b = np.nonzero(second)
    rows_overlap = rows_a.max() >= rows_b.min() and rows_b.max() >= rows_a.min()
    cols_overlap = cols_a.max() >= cols_b.min() and cols_b.max() >= cols_a.min()
    if rows_overlap and cols_a.max() < cols_b.min():
        return "left of"
    if rows_overlap and cols_b.max() < cols_a.min():
        return "right of"
    if cols_overlap and rows_a.max() < rows_b.min():
        return "above"
    if cols_overlap and rows_b.max() < rows_a.min():
        return "below"
    return None


def test_every_caption_is_rederived_from_its_scene_and_parses(scenes):
    train, evaluation, _ = scenes
    for dataset in (train, evaluation):
        for caption, scene in zip(dataset.captions, dataset.scenes):
            assert scene.caption == caption
            parsed = parse_caption(caption)
            assert parsed == scene.parsed()
            assert parsed.text() == caption
            assert 1 <= len(parsed.objects) <= 3 and len(parsed.relations) == len(parsed.objects) - 1


def test_images_redraw_from_scenes_and_show_what_the_caption_says(scenes):
    train, _, _ = scenes
    size = train.image_size
    redrawn = render_scenes(train.scenes, size).transpose(0, 3, 1, 2)
    assert np.array_equal(redrawn, train.images)
    for image, scene in zip(redrawn[:300], train.scenes[:300]):
        masks = shape_masks(scene, size)
        # No overlap: the shapes' pixels are disjoint and together make up the whole picture.
        assert all(mask.sum() >= 9 for mask in masks)
        assert sum(mask.sum() for mask in masks) == image.any(axis=0).sum()
        for mask, shape in zip(masks, scene.shapes):
            assert (image[:, mask].T == COLOURS[shape.colour]).all()
        relations = scene.parsed().relations
        for (first, second), relation in zip(zip(masks, masks[1:]), relations):
            assert relation_in_pixels(first, second) == relation


def test_identical_images_have_identical_captions(scenes):
    train, evaluation, _ = scenes
    captions_by_image = defaultdict(set)
    for dataset in (train, evaluation):
        for image, caption in zip(dataset.images, dataset.captions):
            captions_by_image[image.tobytes()].add(caption)
    assert all(len(captions) == 1 for captions in captions_by_image.values())


def test_no_two_shapes_in_a_scene_share_colour_and_shape_and_mention_order_is_fixed():
    for scene in generate_scenes(2000, seed=1):
        ranks = [list(COLOURS).index(s.colour) * len(SHAPES) + SHAPES.index(s.kind) for s in scene.shapes]
        assert ranks == sorted(set(ranks))


def test_every_relation_and_shape_count_occurs(scenes):
    train, _, _ = scenes
    relations = {r for scene in train.scenes for r in scene.parsed().relations}
    counts = {len(scene.shapes) for scene in train.scenes}
    assert relations == set(RELATIONS) and counts == {1, 2, 3}
    single, _, _ = make_dataset({"num_train": 50, "num_eval": 5, "max_shapes": 1})
    assert {len(s.shapes) for s in single.scenes} == {1} and single.max_len == 5


def test_vocabulary_is_closed(scenes):
    train, evaluation, tokenizer = scenes
    assert tokenizer.vocab_size == 4 + len(WORDS) == 20
    assert tokenizer.id_to_token[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    for dataset in (train, evaluation):
        assert {w for c in dataset.captions for w in c.split()} <= set(WORDS)
        assert not (dataset.tokens == UNK).any()


def test_unclear_relation_is_refused():
    touching = Scene((Shape("red", "circle", 0.3, 0.3, 0.1), Shape("blue", "square", 0.45, 0.45, 0.1)))
    with pytest.raises(ValueError, match="no clear relation"):
        touching.caption


# ---- grammar and comparison ---------------------------------------------------------------------

objects = st.tuples(st.sampled_from(list(COLOURS)), st.sampled_from(SHAPES))
captions = st.integers(1, 3).flatmap(lambda n: st.tuples(
    st.lists(objects, min_size=n, max_size=n).map(tuple),
    st.lists(st.sampled_from(RELATIONS), min_size=n - 1, max_size=n - 1).map(tuple),
)).map(lambda parts: Caption(*parts))


@settings(max_examples=200, deadline=None)
@given(captions)
def test_caption_text_round_trips_through_parser_and_tokenizer(caption):
    tokenizer = Tokenizer(WORDS)
    text = caption.text()
    assert parse_caption(text) == caption
    ids = tokenizer.encode(text, length=16)
    assert len(ids) == 16 and ids[0] == 1 and UNK not in ids
    assert tokenizer.decode(ids) == text
    restored = Tokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert restored == tokenizer and restored.encode(text) == tokenizer.encode(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="abcXYZ.,! '\n", max_size=20), min_size=1, max_size=5))
def test_tokenizer_built_from_texts_round_trips_them(texts):
    tokenizer = Tokenizer.from_texts(texts)
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == " ".join(data.split_words(text))
    assert Tokenizer.from_texts(reversed(texts)) == tokenizer  # ids do not depend on text order
    assert tokenizer.encode("never-seen-word")[1] == UNK


def test_tokenizer_refuses_a_length_that_would_drop_eos():
    with pytest.raises(ValueError, match="needs 5 tokens"):
        Tokenizer(WORDS).encode("a red circle", length=4)


def test_caption_matches_compares_parts():
    target = "a red circle left of a blue square"
    assert caption_matches(target, target) == dict.fromkeys(
        ("parsed", "exact", "count", "colours", "shapes", "objects", "relations"), True)
    assert caption_matches("a blue square right of a red circle", target)["exact"]  # same statement
    wrong_relation = caption_matches("a red circle above a blue square", target)
    assert wrong_relation["objects"] and not wrong_relation["relations"] and not wrong_relation["exact"]
    wrong_colour = caption_matches("a red circle left of a green square", target)
    assert wrong_colour["shapes"] and not wrong_colour["colours"] and wrong_colour["relations"]
    assert not caption_matches("a red circle", target)["count"]
    assert caption_matches("red red red", target) == dict.fromkeys(wrong_relation, False)


@pytest.mark.parametrize("text, where", [
    ("", "word 1"), ("a red", "word 3"), ("a pink circle", "word 2"), ("a red circle near a blue square", "word 4"),
    ("a red circle left of", "word 6"),
])
def test_parse_errors_name_the_word(text, where):
    with pytest.raises(DataError, match=where) as err:
        parse_caption(text)
    assert "\n" not in str(err.value)


# ---- batches and iteration ----------------------------------------------------------------------


def test_batch_arrays(scenes):
    train, _, tokenizer = scenes
    batch = train.batch([3, 0, 5])
    assert batch["images"].dtype == np.float32 and batch["images"].shape == (3, 3, 32, 32)
    assert batch["images"].min() == -1.0 and batch["images"].max() <= 1.0  # black background is -1
    tokens, targets, lengths = batch["tokens"], batch["targets"], batch["lengths"]
    assert tokens.dtype == targets.dtype == lengths.dtype == np.int64 and tokens.shape == targets.shape == (3, 15)
    for row, index in enumerate([3, 0, 5]):
        n = lengths[row]
        assert tokenizer.decode(tokens[row]) == train.captions[index]
        assert tokens[row, 0] == tokenizer.bos_id and tokens[row, n - 1] == tokenizer.eos_id
        assert (tokens[row, n:] == PAD).all()
        assert np.array_equal(targets[row, : n - 1], tokens[row, 1:n])
        assert (targets[row, n - 1 :] == IGNORE_INDEX).all()
    assert list(batch["indices"]) == [3, 0, 5]


def test_epochs_visit_every_sample_once_in_a_seeded_order(scenes):
    train, evaluation, _ = scenes
    epoch = [b["indices"] for b in train.iter_batches(100, seed=1, epochs=1)]
    assert len(epoch) == 6 and sorted(np.concatenate(epoch)) == list(range(600))
    second = np.concatenate([b["indices"] for b in train.iter_batches(100, seed=1, epoch=1, epochs=2)])
    assert not np.array_equal(np.concatenate(epoch), second)
    sizes = [len(b["indices"]) for b in evaluation.iter_batches(30, shuffle=False, drop_last=False, epochs=1)]
    assert sizes == [30, 30, 30, 10]


def test_resumed_iteration_sees_the_same_batches(scenes):
    train, _, _ = scenes
    whole = [b["indices"] for b in train.iter_batches(64, seed=5, epochs=3)]  # 9 steps an epoch
    first = train.iter_batches(64, seed=5, epochs=3)
    head = [next(first)["indices"] for _ in range(11)]
    saved = json.loads(json.dumps(first.state()))
    assert saved["epoch"] == 1 and saved["step"] == 2
    tail = [b["indices"] for b in train.resume(saved, epochs=3)]
    assert len(head) + len(tail) == len(whole)
    assert all(np.array_equal(a, b) for a, b in zip(head + tail, whole))
    # A global step carries into the epoch.
    from_step = next(train.iter_batches(64, seed=5, start_step=11))
    assert np.array_equal(from_step["indices"], whole[11])


def test_resume_refuses_another_dataset_size(scenes):
    train, evaluation, _ = scenes
    state = train.iter_batches(10).state()
    with pytest.raises(DataError, match="600 samples but the dataset has 100"):
        evaluation.resume(state)


def test_batch_larger_than_dataset_is_refused(scenes):
    _, evaluation, _ = scenes
    with pytest.raises(DataError, match="larger than the dataset"):
        evaluation.iter_batches(101)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"num_trian": 5}, "unknown data option"),
    ({"max_shapes": 4}, "data.max_shapes must be an integer from 1 to 3"),
    ({"seed": -1}, "data.seed"),
    ({"num_train": "10"}, "data.num_train"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"max_len": 10}, "at least 15"),
    ({"name": "imagenet"}, "valid: scenes, folder"),
    ({"name": "folder"}, "data.path"),
])
def test_config_errors(config, message):
    with pytest.raises(DataError, match=message):
        make_dataset(config)


# ---- user folders -------------------------------------------------------------------------------


def write_folder(root, lines, images=("a.png", "b.jpg", "sub/c.png")):
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    for name, colour in zip(images, colours):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 24), colour).save(path)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


GOOD_LINES = [
    json.dumps({"image": "a.png", "caption": "A red thing."}),
    "",
    json.dumps({"image": "b.jpg", "caption": "a blue thing"}),
    json.dumps({"image": "sub/c.png", "caption": "a green thing"}),
    json.dumps({"image": "a.png", "caption": "something red"}),
]


def test_folder_happy_path(tmp_path):
    root = write_folder(tmp_path, GOOD_LINES)
    Image.new("L", (8, 8), 128).save(root / "grey.png")  # grayscale becomes RGB
    (root / "captions.jsonl").write_text("\n".join(GOOD_LINES + [json.dumps({"image": "grey.png", "caption": "grey"})]))
    train, evaluation, tokenizer = make_dataset({"path": str(root), "num_eval": 1, "image_size": 16, "seed": 3})
    assert len(train) + len(evaluation) == 5 and len(evaluation) >= 1
    assert tokenizer.words == tuple(sorted({"a", "red", "thing", ".", "blue", "green", "something", "grey"}))
    # Both captions of a.png stay on one side of the split.
    sides = {"train": train.captions, "eval": evaluation.captions}
    assert len([side for side, caps in sides.items() if {"a red thing .", "something red"} & set(caps)]) == 1
    everything = {c: train for c in train.captions} | {c: evaluation for c in evaluation.captions}
    index = everything["a blue thing"].captions.index("a blue thing")
    batch = everything["a blue thing"].batch([index])
    assert batch["images"].shape == (1, 3, 16, 16) and train.max_len == evaluation.max_len == 6
    assert batch["images"][0, 2].mean() > 0.9 and batch["images"][0, 0].mean() < -0.8  # blue, JPEG-close
    assert not (train.tokens == UNK).any()


def test_folder_with_a_saved_tokenizer_maps_new_words_to_unk(tmp_path):
    root = write_folder(tmp_path, GOOD_LINES)
    _, _, tokenizer = make_dataset({"path": str(root), "num_eval": 0}, tokenizer=Tokenizer(WORDS))
    train, _, _ = make_dataset({"path": str(root), "num_eval": 0}, tokenizer=tokenizer)
    assert tokenizer == Tokenizer(WORDS) and (train.tokens == UNK).any()


def _corrupt(root):
    (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def _truncated(root):
    raw = (root / "a.png").read_bytes()
    (root / "a.png").write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("lines, damage, where, message", [
    (GOOD_LINES, lambda root: (root / "captions.jsonl").unlink(), "captions.jsonl", "not found"),
    (GOOD_LINES[:2] + ['{"image": "b.jpg", "caption": '], None, "captions.jsonl:3", "not valid JSON"),
    (GOOD_LINES[:1] + ['["a.png", "a red thing"]'], None, "captions.jsonl:2", "expected a JSON object"),
    (GOOD_LINES[:3] + [json.dumps({"image": "sub/c.png"})], None, "captions.jsonl:4", "missing key 'caption'"),
    ([json.dumps({"caption": "x"})], None, "captions.jsonl:1", "missing key 'image'"),
    (GOOD_LINES[:3] + [json.dumps({"image": "sub/c.png", "caption": "  "})], None, "captions.jsonl:4", "empty caption"),
    (GOOD_LINES[:1] + [json.dumps({"image": "gone.png", "caption": "x"})], None, "captions.jsonl:2", "image not found"),
    (GOOD_LINES, _corrupt, "captions.jsonl:1", "cannot read image"),
    (GOOD_LINES, _truncated, "captions.jsonl:1", "cannot read image"),
    ([""], None, "captions.jsonl", "no samples"),
])
def test_folder_errors_are_one_line_and_name_the_place(tmp_path, lines, damage, where, message):
    root = write_folder(tmp_path, lines)
    if damage:
        damage(root)
    with pytest.raises(DataError) as err:
        make_dataset({"path": str(root), "num_eval": 0})
    text = str(err.value)
    assert "\n" not in text and where in text and message in text, text


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        make_dataset({"path": str(tmp_path / "nowhere")})


def test_too_long_caption_names_its_line(tmp_path):
    root = write_folder(tmp_path, GOOD_LINES)
    with pytest.raises(DataError, match=r"captions.jsonl:1: caption needs 6 tokens but max_len is 5"):
        make_dataset({"path": str(root), "num_eval": 0, "max_len": 5})
