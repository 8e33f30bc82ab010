"""Config composition and validation: the corpus of bad configs, then the paths that must work."""

from __future__ import annotations

from importlib import resources

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ReadonlyConfigError

from isthmus.config import composer
from isthmus.config.composer import ConfigError, to_yaml
from isthmus.config.schema import ModelBase, Precision, RunConfig
from isthmus.data.scene_data import ScenesConfig
from isthmus.models.captioner.config import CaptionerConfig
from isthmus.registry.manager import load_plugins

BUILTIN = load_plugins(autoload=False)[1]  # the built-in plugins: their config directories and schemas


def compose(overrides=(), config_dirs=(), known=None, schemas=None, **options):
    """``compose`` over the built-in plugins' config directories and schemas (as the command line
    composes), plus the test's own."""
    merged = BUILTIN.config_schemas()
    for section, names in (schemas or {}).items():
        merged.setdefault(section, {}).update(names)
    return composer.compose(overrides, config_dirs=[*BUILTIN.config_dirs, *config_dirs], known=known, schemas=merged,
                            **options)


def from_yaml(text, source="<yaml>"):
    return composer.from_yaml(text, source=source, schemas=BUILTIN.config_schemas())


def group_options(config_dirs=()):
    return composer.group_options([*BUILTIN.config_dirs, *config_dirs])

CORPUS = yaml.safe_load((Path(__file__).parent / "bad_configs.yaml").read_text(encoding="utf-8"))
KNOWN = {"backend.name": ["cpu", "reference", "example"], "model.name": ["tiny-captioner", "plugin-t2i"]}

# The shipped default, read from its file so retuning the main job does not break these tests.
DEFAULT_STEPS = yaml.safe_load(resources.files("isthmus.configs").joinpath("train/default.yaml").read_text())["steps"]


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def assert_one_clean_line(message: str) -> None:
    assert "\n" not in message
    for leak in ("Traceback", "full_key", "object_type", "reference_type"):
        assert leak not in message


# --- the corpus ------------------------------------------------------------------------------


def test_corpus_is_large_and_ids_are_unique():
    ids = [entry["id"] for entry in CORPUS]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_bad_config_is_refused_with_one_line_naming_the_problem(entry, tmp_path):
    extra = write_files(tmp_path, entry.get("files", {}))
    with pytest.raises(ConfigError) as caught:
        compose(entry["overrides"], config_dirs=[extra], known=entry.get("known"))
    message = str(caught.value)
    assert_one_clean_line(message)
    for expected in entry["expect"]:
        assert expected in message


def test_every_problem_is_reported_first_one_first():
    with pytest.raises(ConfigError) as caught:
        compose(["train.steps=abc", "train.precision=fp8", "model.dropout=2.0"])
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["model.dropout", "train.steps", "train.precision"]
    assert str(caught.value) == "; ".join(problems)


def test_missing_config_dir_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        group_options([tmp_path / "nope"])


# --- good paths ------------------------------------------------------------------------------


def test_defaults_compose_to_a_read_only_structured_run_config():
    cfg = compose()
    assert OmegaConf.get_type(cfg) is RunConfig
    assert OmegaConf.get_type(cfg.model) is CaptionerConfig
    assert cfg.backend.name == "auto" and cfg.model.name == "tiny-captioner" and cfg.data.name == "scenes"
    assert cfg.train.steps == DEFAULT_STEPS and cfg.train.betas == (0.9, 0.999)
    assert cfg.train.precision == "fp32" and cfg.train.precision is Precision.fp32
    assert cfg.name == "tiny-captioner" and cfg.output_dir == "runs/tiny-captioner"
    assert cfg.data.image_size == cfg.model.image_size == 32
    assert not OmegaConf.missing_keys(cfg)
    # The interpolated defaults (name, output_dir, data.seed, data.image_size) resolved.
    default = OmegaConf.to_object(cfg)
    assert default.model == CaptionerConfig() and default.data == ScenesConfig(seed=0, image_size=32)
    assert (default.name, default.output_dir, default.train) == ("tiny-captioner", "runs/tiny-captioner", RunConfig().train)
    with pytest.raises(ReadonlyConfigError):
        cfg.train.steps = 5
    with pytest.raises(ReadonlyConfigError):
        cfg.backend.options["x"] = 1


def test_group_options_lists_the_shipped_files():
    options = group_options()
    assert options["backend"] == ["ascend", "auto", "cpu", "cuda", "reference"]
    assert options["model"] == ["glm-image-ar", "glm-image-dit", "glm4", "llama", "qwen2", "tiny-captioner", "tiny-t2i",
                                "torch-module"]
    assert options["data"] == ["dit-latents", "image-folder", "scenes", "text-jsonl"]
    assert options["train"] == ["default", "quick", "t2i"]


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in group_options().items() for o in opts])
def test_every_shipped_option_composes(group, option):
    # The options without a default: an image folder's path, a wrapped module's factory.
    needs = {"image-folder": {"data.path": "."}, "torch-module": {"model.factory": "x.y:build"}}.get(option, {})
    cfg = compose([f"{group}={option}", *(f"{k}={v}" for k, v in needs.items())],
                  known={"backend.name": ["ascend", "cpu", "cuda", "reference"]})
    import json

    # The composed section holds every value of the option's file (an ${interpolation} as resolved).
    file = next(Path(str(d)) / group / f"{option}.yaml" for d in [resources.files("isthmus.configs"), *BUILTIN.config_dirs]
                if (Path(str(d)) / group / f"{option}.yaml").is_file())
    shipped = yaml.safe_load(file.read_text())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    section = json.loads(json.dumps(resolved[group]))  # tuples as lists
    for key, value in shipped.items():
        if f"{group}.{key}" in needs:
            continue
        if isinstance(value, str) and value.startswith("${"):
            value = OmegaConf.create({**resolved, "probe": value}).probe
        assert section[key] == value, f"{group}={option}: {key} is {section[key]!r}, the file says {value!r}"


def test_a_model_schema_is_chosen_by_the_sections_name():
    cfg = compose(["model=tiny-t2i", "model.guidance=2"])
    assert cfg.model.guidance == 2.0 and cfg.model.codebook_size == 1024
    with pytest.raises(ConfigError, match="model.n_layers_text"):  # a captioner key on the t2i model
        compose(["model=tiny-t2i", "model.n_layers_text=3"])


def test_group_switch_replaces_the_section():
    cfg = compose(["backend=reference", "train=quick"])
    assert cfg.backend.name == "reference" and cfg.backend.strict is True
    assert cfg.train.steps == 20 and cfg.train.nan_policy == "stop"


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = compose(["train.lr=3e-4", "backend.engine=torch", "backend.threads=4", "backend.options.hf32=true"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.backend.engine == "torch" and cfg.backend.threads == 4
    assert cfg.backend.options == {"hf32": True}
    assert compose(["backend.engine=null"]).backend.engine is None
    assert compose(["train.clip_norm=null"]).train.clip_norm is None
    assert compose(["train.lr=1"]).train.lr == 1.0  # an int is a fine float
    assert compose(["name=2024"]).name == "2024"  # a number is a fine name


def test_list_override():
    assert compose(["train.betas=[0.9,0.95]"]).train.betas == (0.9, 0.95)


def test_interpolations_follow_overrides():
    cfg = compose(["seed=7", "name=trial", "model.image_size=64"])
    assert cfg.data.seed == 7
    assert cfg.output_dir == "runs/trial"
    assert cfg.data.image_size == 64


def test_group_choices_apply_before_key_overrides_wherever_they_stand():
    before = compose(["train.steps=7", "train=quick"])
    after = compose(["train=quick", "train.steps=7"])
    assert before == after
    assert after.train.steps == 7 and after.train.batch_size == 8


def test_the_same_key_twice_takes_the_last():
    assert compose(["train.steps=500", "train.steps=900"]).train.steps == 900
    assert compose(["train=quick", "train=default"]).train.steps == DEFAULT_STEPS


def test_known_lists_each_valid_name_once():
    with pytest.raises(ConfigError) as caught:
        compose(["backend.name=tpu"], known={"backend.name": ["auto", "cpu", "cpu"]})
    assert "valid: auto, cpu" in str(caught.value) and "cpu, cpu" not in str(caught.value)


def test_known_accepts_registered_names_and_auto():
    assert compose(known=KNOWN).backend.name == "auto"
    assert compose(["backend=cpu"], known=KNOWN).backend.name == "cpu"
    assert compose(["backend.engine=null"], known={"backend.engine": ["torch"]}).backend.engine is None


def test_extra_dir_adds_an_option(tmp_path):
    extra = write_files(tmp_path, {"backend/example.yaml": "name: example\noptions: {lanes: 4}\n"})
    assert group_options([extra])["backend"] == ["ascend", "auto", "cpu", "cuda", "example", "reference"]
    cfg = compose(["backend=example"], config_dirs=[extra], known=KNOWN)
    assert cfg.backend.name == "example" and cfg.backend.options.lanes == 4
    assert cfg.backend.strict is False  # schema defaults fill what the file leaves out
    assert group_options([extra, extra]) == group_options([extra])  # one dir given twice is one dir


@dataclasses.dataclass
class PluginT2IConfig(ModelBase):
    """A plugin model's own schema."""

    name: str = "plugin-t2i"
    codebook_size: int = dataclasses.field(default=256, metadata={"bounds": {"ge": 2}})
    image_size: int = 32
    depth: int = MISSING  # required: OmegaConf's marker


def test_plugin_model_with_its_own_schema(tmp_path):
    extra = write_files(tmp_path, {"model/plugin-t2i.yaml": "name: plugin-t2i\ndepth: 3\n"})
    schemas = {"model": {"plugin-t2i": PluginT2IConfig}}
    cfg = compose(["model=plugin-t2i"], config_dirs=[extra], known=KNOWN, schemas=schemas)
    assert OmegaConf.get_type(cfg.model) is PluginT2IConfig
    assert cfg.model.codebook_size == 256 and cfg.model.depth == 3
    with pytest.raises(ConfigError, match=r"model\.d_model: unknown key"):
        compose(["model=plugin-t2i", "model.d_model=8"], config_dirs=[extra], schemas=schemas)
    with pytest.raises(ConfigError, match=r"model\.codebook_size: must be >= 2"):
        compose(["model=plugin-t2i", "model.codebook_size=1"], config_dirs=[extra], schemas=schemas)
    (extra / "model/plugin-t2i.yaml").write_text("name: plugin-t2i\n")
    with pytest.raises(ConfigError, match=r"model\.depth: missing value"):
        compose(["model=plugin-t2i"], config_dirs=[extra], schemas=schemas)


def test_unusable_plugin_schemas_are_config_errors(tmp_path):
    @dataclasses.dataclass
    class OddTypes(ModelBase):
        name: str = "odd"
        widths: set = dataclasses.field(default_factory=set)

    extra = write_files(tmp_path, {"model/odd.yaml": "name: odd\n"})
    cases = [
        (OddTypes, "model: schema OddTypes is not usable"),
        (dict, "model.name: the schema for 'odd' must be a dataclass"),
    ]
    for schema, expected in cases:
        with pytest.raises(ConfigError, match=expected) as caught:
            compose(["model=odd"], config_dirs=[extra], schemas={"model": {"odd": schema}})
        assert_one_clean_line(str(caught.value))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("defaults: {backend: auto}\n", "'defaults' must be a list"),
        ("defaults:\n  - backend\n", "a 'defaults' entry must be 'group: option'"),
        ("defaults:\n  - backnd: auto\n", "unknown config group 'backnd' (did you mean 'backend'?)"),
        ("defaults:\n  - backend: cdua\n", "backend=cdua (in "),
    ],
)
def test_bad_defaults_file(text, expected, tmp_path, monkeypatch):
    import isthmus.config.composer

    package = write_files(tmp_path, {"defaults.yaml": text, "backend/auto.yaml": "name: auto\n"})
    monkeypatch.setattr(isthmus.config.composer, "_package_dir", lambda: package)
    with pytest.raises(ConfigError) as caught:
        compose()
    assert expected in str(caught.value)
    assert_one_clean_line(str(caught.value))


def test_yaml_round_trip():
    cfg = compose(["backend=cpu", "train=quick", "train.betas=[0.8,0.9]", "backend.options.allow_hf32=true"])
    text = to_yaml(cfg)
    assert yaml.safe_load(text)["train"]["betas"] == [0.8, 0.9]  # plain YAML, no tags
    again = from_yaml(text)
    assert again == cfg and OmegaConf.get_type(again) is RunConfig and OmegaConf.is_readonly(again)
    assert to_yaml(again) == text


def test_from_yaml_validates(tmp_path):
    text = to_yaml(compose()).replace(f"steps: {DEFAULT_STEPS}", "steps: -3")
    with pytest.raises(ConfigError, match=r"train\.steps: must be >= 1, got -3 \(in ckpt\.yaml\)"):
        from_yaml(text, source="ckpt.yaml")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="abcdeginrstx.=_-[]{}:,$?+~ 0123456789", max_size=20), max_size=3))
def test_any_override_gives_a_config_or_a_one_line_config_error(overrides):
    try:
        compose(overrides)
    except ConfigError as err:
        assert_one_clean_line(str(err))


def test_public_names():
    import isthmus.config.composer

    assert sorted(isthmus.config.composer.__all__) == sorted(
        ["ConfigError", "compose", "from_yaml", "group_options", "read_config_file", "to_yaml", "RunConfig"]
        + ["BackendConfig"]
        + ["ModelBase", "DataBase", "TrainConfig"]
        + ["Mlp", "NanPolicy", "Norm", "Precision", "Schedule"]
    )
    assert all(hasattr(isthmus.config.composer, name) for name in isthmus.config.composer.__all__)


# --- the corpus through the command line ----------------------------------------------------------
@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_bad_config_through_the_cli_exits_2_with_one_line(entry, tmp_path, monkeypatch, capsys):
    # The corpus files reach the CLI the way a plugin's would: through register_config_dirs.
    from isthmus.cli import main as cli
    from isthmus.registry import manager as plugin_manager
    from isthmus.registry.hookspecs import hookimpl

    extra = write_files(tmp_path, entry.get("files", {}))

    class CorpusDirs:
        @staticmethod
        @hookimpl
        def register_config_dirs():
            return extra

    manager, registry = plugin_manager.load_plugins(autoload=False, extra=[("corpus", CorpusDirs)])
    monkeypatch.setattr(plugin_manager, "_registry", registry)
    monkeypatch.setattr(plugin_manager, "_manager", manager)
    code = cli.main(["config", "show", *entry["overrides"]])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isthmus: error: "), captured.err
    assert "Traceback" not in captured.err


# --- user config files (--config) ------------------------------------------------------------------


def test_a_user_file_is_merged_over_the_defaults_before_the_overrides(tmp_path):
    mine = write_files(tmp_path, {"mine.yaml": "train: {steps: 10, lr: 0.5, warmup_steps: 1}\nbackend: {name: cpu}\nseed: 3\n"})
    mine = mine / "mine.yaml"
    cfg = compose(config_files=[mine])
    assert cfg.train.steps == 10 and cfg.train.lr == 0.5 and cfg.backend.name == "cpu" and cfg.seed == 3
    assert cfg.train.batch_size == compose().train.batch_size  # the rest of train/default.yaml stays
    assert cfg.data.seed == 3  # interpolations follow the file's values
    cfg = compose(["train.steps=7", "seed=1"], config_files=[mine])
    assert cfg.train.steps == 7 and cfg.seed == 1 and cfg.train.lr == 0.5  # overrides win, the rest stays


def test_user_files_apply_in_the_order_given(tmp_path):
    files = write_files(tmp_path, {"a.yaml": "train: {steps: 10, lr: 0.5, warmup_steps: 1}\n", "b.yaml": "train: {steps: 20}\n"})
    a, b = files / "a.yaml", files / "b.yaml"
    first = compose(config_files=[a, b])
    assert first.train.steps == 20 and first.train.lr == 0.5  # b over a, key by key
    assert compose(config_files=[b, a]).train.steps == 10


def test_a_user_file_picks_group_options(tmp_path):
    files = write_files(tmp_path, {"quick.yaml": "train: quick\nbackend: reference\n",
                                   "steps.yaml": "train: {steps: 12}\n"})
    cfg = compose(config_files=[files / "quick.yaml"])
    assert cfg.train.batch_size == 8 and cfg.backend.name == "reference" and cfg.backend.strict is True
    # Choices act before keys: a later file's keys land on the option an earlier file picked.
    cfg = compose(config_files=[files / "steps.yaml", files / "quick.yaml"])
    assert cfg.train.steps == 12 and cfg.train.batch_size == 8
    # A choice on the command line beats a file's.
    assert compose(["train=default"], config_files=[files / "quick.yaml"]).train.batch_size == 64
    with pytest.raises(ConfigError, match=r"train=qiuck \(in .*bad\.yaml\): unknown train option 'qiuck' "
                                          r"\(did you mean 'quick'\?\)"):
        compose(config_files=[write_files(tmp_path, {"bad.yaml": "train: qiuck\n"}) / "bad.yaml"])


def test_a_config_written_by_config_show_reads_back_as_it_was(tmp_path):
    schemas = BUILTIN.config_schemas()
    cfg = compose(["model=tiny-t2i", "backend=cpu", "train=quick", "seed=5", "model.guidance=2"], schemas=schemas)
    (tmp_path / "run.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    # The file names tiny-t2i while the defaults pick tiny-captioner: it must not mix the two.
    assert compose(config_files=[tmp_path / "run.yaml"], schemas=schemas) == cfg
    assert compose(["model.name=tiny-t2i"], schemas=schemas).model.codebook_size == 1024


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("missing.yaml", None, "no such config file"),
        ("folder", "", "is a directory"),
        ("bad.yaml", "train: {steps: 10\n", "bad YAML at line 2"),
        ("list.yaml", "- train\n- seed\n", "must be a mapping, got a list"),
        ("dup.yaml", "seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("dotted.yaml", "train.steps: 10\n", "key 'train.steps': nest it (train: {steps: ...})"),
        ("defaults.yaml", "defaults:\n  - backend: cpu\n", "'defaults' lists belong to the package's"),
        ("number.yaml", "train: 5\n", "train is a config group: give an option name (one of default, quick, t2i)"),
        ("binary.yaml", b"\xff\xfe\x00", "cannot read a config file"),
    ],
)
def test_a_bad_user_file_is_one_line_naming_it(name, text, expected, tmp_path):
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        compose(config_files=[path])
    message = str(caught.value)
    assert_one_clean_line(message)
    assert message.startswith(f"{path}: ") and expected in message, message


def test_problems_with_a_user_files_values_name_the_file(tmp_path):
    mine = write_files(tmp_path, {"mine.yaml": "train: {steps: -1}\ntrian: {steps: 1}\n"}) / "mine.yaml"
    with pytest.raises(ConfigError) as caught:
        compose(config_files=[mine])
    problems = caught.value.problems
    assert "trian: unknown key (did you mean 'train'?)" in problems[0] and problems[0].endswith(f"(in {mine})")
    assert any(p.startswith("train.steps: must be >= 1, got -1") and p.endswith(f"(in {mine})") for p in problems)
    # Overridden on the command line, the value is no longer the file's.
    with pytest.raises(ConfigError) as caught:
        compose(["train.steps=-2"], config_files=[mine])
    assert any(p == "train.steps: must be >= 1, got -2" for p in caught.value.problems)


# --- defaults that follow other keys live in the schema ----------------------------------------


def test_a_partial_option_file_inherits_the_interpolated_defaults(tmp_path):
    extra = write_files(tmp_path, {"dirs/data/mine.yaml": "name: scenes\nnum_train: 50\n",
                                   "pick.yaml": "data: mine\nseed: 3\n",
                                   "partial.yaml": "data: {num_eval: 10}\nseed: 5\nmodel: {image_size: 64}\n"})
    cfg = compose(["data=mine", "seed=7", "model.image_size=64"], config_dirs=[extra / "dirs"])
    assert cfg.data.num_train == 50 and cfg.data.seed == 7 and cfg.data.image_size == 64
    cfg = compose(config_dirs=[extra / "dirs"], config_files=[extra / "pick.yaml"])
    assert cfg.data.num_train == 50 and cfg.data.seed == 3 and cfg.data.image_size == cfg.model.image_size
    cfg = compose(config_files=[extra / "partial.yaml"])
    assert cfg.data.num_eval == 10 and cfg.data.seed == 5 and cfg.data.image_size == 64
    assert cfg.name == "tiny-captioner" and cfg.output_dir == "runs/tiny-captioner"


def option_file(group: str, option: str) -> Path:
    """The shipped option file ``<group>/<option>.yaml``: the package's, or a built-in plugin's (a
    model package ships its own)."""
    for root in [Path(str(resources.files("isthmus.configs"))), *map(Path, BUILTIN.config_dirs)]:
        if (root / group / f"{option}.yaml").is_file():
            return root / group / f"{option}.yaml"
    raise AssertionError(f"no {group}/{option}.yaml")


def schema_for(group: str, option: str) -> type:
    """The schema a shipped option file is checked against: its section's, or (model and data)
    the one registered under the ``name`` the file gives."""
    import isthmus.config.schema as schema_module

    if group in ("model", "data"):
        name = yaml.safe_load(option_file(group, option).read_text(encoding="utf-8"))["name"]
        return BUILTIN.config_schemas()[group][name]
    return {"backend": schema_module.BackendConfig, "train": schema_module.TrainConfig}[group]


def keys_outside_schema(group: str, option: str, schema: type) -> list[str]:
    """The keys of the shipped option file ``<group>/<option>.yaml`` that ``schema`` has no field
    for. Option files hold values; the schema names every key and holds the defaults that follow
    other keys, so a file may leave any key out. Apply it to any section: (group, option, schema)."""
    text = option_file(group, option).read_text(encoding="utf-8")
    fields = {f.name for f in dataclasses.fields(schema)}
    return [key for key in (yaml.safe_load(text) or {}) if key not in fields]


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in group_options().items() for o in opts])
def test_shipped_option_files_name_only_schema_keys_and_hold_no_interpolation(group, option):
    schema = schema_for(group, option)
    assert keys_outside_schema(group, option, schema) == []
    text = option_file(group, option).read_text(encoding="utf-8")
    assert "${" not in "".join(line.split("#")[0] for line in text.splitlines())
    if group == "model":  # a model's hyperparameters: the file gives a value for each field, no more
        assert set(yaml.safe_load(text)) == {f.name for f in dataclasses.fields(schema)}


def test_keys_outside_schema_finds_a_stray_key():
    assert keys_outside_schema("train", "quick", RunConfig) != []  # train keys are not run-wide ones
    assert keys_outside_schema("data", "scenes", ScenesConfig) == []


# --- backend.options against each backend's declaration -------------------------------------------


@pytest.fixture
def cli_registry(monkeypatch):
    """The CLI's config path (``compose_config``) on a registry of the built-in plugins plus
    ``extra`` in-process ones; returns a function ``(overrides, config_files, extra) -> cfg``."""
    from isthmus.cli import main as cli
    from isthmus.registry import manager as plugin_manager

    def compose_with(overrides=(), config_files=(), extra=()):
        manager, registry = plugin_manager.load_plugins(autoload=False, extra=extra)
        monkeypatch.setattr(plugin_manager, "_registry", registry)
        monkeypatch.setattr(plugin_manager, "_manager", manager)
        return cli.compose_config(overrides, config_files)

    return compose_with


def refused(compose_with, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        compose_with(*args, **kwargs)
    assert_one_clean_line(str(caught.value))
    return str(caught.value)


def test_option_typos_are_refused_for_backends_this_machine_cannot_run(cli_registry):
    # No Ascend or NVIDIA device, driver or engine here: the check must not need any of them.
    message = refused(cli_registry, ["backend=ascend", "backend.options.allow_hf23=true"])
    assert message == ("backend.options.allow_hf23: unknown ascend option (did you mean 'allow_hf32'?); "
                       "valid: allow_hf32, precision_mode, mode, jit_level, fallback, fused_kernels")
    message = refused(cli_registry, ["backend=cuda", "backend.options.allow_tf23=true"])
    assert message.startswith("backend.options.allow_tf23: unknown cuda option (did you mean 'allow_tf32'?); "
                              "valid: allow_tf32, compile, compile_mode, fused_kernels")
    # Values too, every problem at once, through each backend's own parser.
    message = refused(cli_registry, ["backend=ascend", "backend.options.precision_mode=fp8",
                                     "backend.options.allow_hf32={matmul: true, cnov: true}"])
    assert "backend.options.precision_mode: 'fp8' is not a MindSpore precision mode" in message
    assert "backend.options.allow_hf32.cnov: unknown; valid: matmul, conv" in message
    assert "compile_mode: 'fast' is not one of default" in refused(
        cli_registry, ["backend=cuda", "backend.options.compile_mode=fast"])
    cfg = cli_registry(["backend=ascend", "backend.options.allow_hf32={matmul: true}", "backend.options.jit_level=O1"])
    assert cfg.backend.options.jit_level == "O1"


def test_option_problems_from_a_user_file_name_it(cli_registry, tmp_path):
    mine = write_files(tmp_path, {"npu.yaml": "backend: {name: ascend, options: {allow_hf23: true}}\n"}) / "npu.yaml"
    message = refused(cli_registry, config_files=[mine])
    assert message.startswith("backend.options.allow_hf23: unknown ascend option") and message.endswith(f"(in {mine})")


def test_backends_without_options_refuse_any(cli_registry):
    assert refused(cli_registry, ["backend=reference", "backend.options.threads=2"]) == (
        "backend.options.threads: the reference backend takes no options")
    assert refused(cli_registry, ["backend=cpu", "backend.options.threads=2"]) == (
        "backend.options.threads: unknown cpu option; valid: mode, jit_level, fallback")
    assert "backend.options.opset: expected an ONNX opset, an int >= 7" in refused(
        cli_registry, ["backend.name=onnxruntime", "backend.options.opset=seventeen"])
    assert cli_registry(["backend.name=onnxruntime", "backend.options.opset=18"]).backend.options.opset == 18


def test_auto_takes_an_option_some_backend_it_may_pick_declares(cli_registry):
    message = refused(cli_registry, ["backend.options.allow_hf23=true"])
    assert message.startswith("backend.options.allow_hf23: no backend that auto may pick (ascend, cuda, cpu) takes "
                              "this option (did you mean 'allow_hf32'?); valid: allow_hf32 (ascend), allow_tf32 (cuda)")
    assert "fused_kernels (ascend, cuda)" in message
    # Each backend that takes a key checks its value: it would fail there, so it fails here.
    message = refused(cli_registry, ["backend.options.fused_kernels=2"])
    assert message == ("backend.options.fused_kernels: expected true or false, got 2 "
                       "(for ascend, cuda, which auto may pick)")
    cfg = cli_registry(["backend.options.allow_tf32=true", "backend.options.allow_hf32=true"])
    assert dict(cfg.backend.options) == {"allow_tf32": True, "allow_hf32": True}


def test_the_backend_auto_picks_gets_only_the_options_it_declares(cli_registry):
    from isthmus.registry.manager import get_registry
    from isthmus.registry.selection import build, select

    cfg = cli_registry(["backend.options.allow_tf32=true"])
    registry = get_registry()
    selection = select(registry, "auto")
    assert selection.spec.name == "cpu"  # this machine has no accelerator
    backend = build(registry, selection, {"options": dict(cfg.backend.options)})
    assert backend.name == "cpu"
    assert selection.trace[-1] == "cpu: backend.options allow_tf32 not passed (it does not take them)"


def _plugin_backend(name: str, options, auto: bool = True):
    from isthmus.registry.hookspecs import hookimpl
    from isthmus.registry.specs import BackendSpec, ProbeResult

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(BackendSpec(name=name, engines=("numpy",), default_engine="numpy", priority=2,
                                 probe=lambda: ProbeResult(usable=True), factory=lambda request: None,
                                 engine_modules={"numpy": ("numpy",)}, auto=auto, options=options))

    return [(name, Plugin)]


def test_a_plugin_backend_declares_its_options(cli_registry):
    from isthmus.registry.specs import BackendOptions

    def parse(options):
        if options.get("lanes", 1) not in (1, 2, 4):
            raise ConfigError(f"backend.options.lanes: expected 1, 2 or 4, got {options['lanes']!r}")

    extra = _plugin_backend("lanes", BackendOptions(("lanes",), parse))
    assert cli_registry(["backend.name=lanes", "backend.options.lanes=4"], extra=extra).backend.options.lanes == 4
    assert refused(cli_registry, ["backend.name=lanes", "backend.options.lanes=3"], extra=extra) == (
        "backend.options.lanes: expected 1, 2 or 4, got 3")
    assert refused(cli_registry, ["backend.name=lanes", "backend.options.lane=3"], extra=extra) == (
        "backend.options.lane: unknown lanes option (did you mean 'lanes'?); valid: lanes")
    assert "lanes (lanes)" in refused(cli_registry, ["backend.options.lane=2"], extra=extra)
    assert cli_registry(["backend.options.lanes=2"], extra=extra).backend.options.lanes == 2


def test_undeclared_and_broken_declarations(cli_registry):
    # Undeclared: only the factory can tell, so nothing is refused here, even under auto.
    extra = _plugin_backend("free", None)
    assert cli_registry(["backend.name=free", "backend.options.anything=1"], extra=extra).backend.options.anything == 1
    assert cli_registry(["backend.options.anything=1"], extra=extra).backend.options.anything == 1
    for path, expected in [("isthmus.nope:OPTIONS", "which cannot be loaded: No module named 'isthmus.nope'"),
                           ("isthmus.backends.cuda.options:KEYS", "which is not a BackendOptions but tuple")]:
        message = refused(cli_registry, ["backend.name=odd", "backend.options.x=1"], extra=_plugin_backend("odd", path))
        assert message.startswith(f"backend 'odd' (plugin odd) declares its options as '{path}', {expected}"), message
