"""SimpleTuner config.json + multidatabackend.json -> the typed tree; every bad input named."""

import json
import shutil
from pathlib import Path

import pytest

from longcat_ray.cli import main
from longcat_ray.config import ConfigError, load_config, strip_json_comments

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, config: dict, backend: list) -> Path:
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = {"--data_backend_config": str(tmp_path / "multidatabackend.json"), **config}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def backend(**edit_overrides) -> list:
    edit = {
        "id": "edit-images", "type": "local", "instance_data_dir": "/data/edits", "caption_strategy": "textfile",
        "resolution": 768, "cache_dir_vae": "/cache/vae/edit", "conditioning_data": ["ref-images"], **edit_overrides,
    }
    ref = {"id": "ref-images", "type": "local", "instance_data_dir": "/data/refs", "caption_strategy": None,
           "resolution": 768, "cache_dir_vae": "/cache/vae/ref"}
    return [edit, ref]


SEED = {"model_type": "lora", "model_family": "longcat_image", "model_flavour": "edit"}


def problems_of(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_seed_config_with_comments_and_strings(tmp_path):
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend()))
    (tmp_path / "config.json").write_text(
        """{
  // the seed's quick-start keys, as SimpleTuner writes them
  "--model_type": "lora", "model_family": "longcat_image", "model_flavour": "edit",
  "base_model_precision": "int8-quanto",      // fp8-torchao also fine
  "--train_batch_size": "2", "gradient_checkpointing": "true", "--learning_rate": "5e-5",
  /* validation */ "validation_guidance": 4.5, "validation_num_inference_steps": "40",
  "validation_resolution": "768x768,1024x512", "--data_backend_config": "%s",
  "report_to": "wandb", "url": "http://not-a-comment//x"
}""" % (tmp_path / "multidatabackend.json")
    )
    config, warnings = load_config(tmp_path / "config.json")
    assert config.model.base_model_precision == "int8-torchao"
    assert config.train.train_batch_size == 2 and config.train.learning_rate == 5e-5
    assert config.train.gradient_checkpointing is True
    assert config.validation.resolution == [(768, 768), (1024, 512)]
    assert config.validation.num_inference_steps == 40
    assert config.data.datasets[1].dataset_type == "conditioning"
    assert any("int8-quanto" in w and "int8-torchao" in w for w in warnings)
    assert any("'report_to'" in w for w in warnings) and any("'url'" in w for w in warnings)


def test_comment_stripping_keeps_strings_and_lines():
    text = '{"a": "x//y", /* 1\n2 */ "b": "/*"} // end'
    assert json.loads(strip_json_comments(text)) == {"a": "x//y", "b": "/*"}
    assert strip_json_comments(text).count("\n") == 1


@pytest.mark.parametrize(
    "config,edit,expected",
    [
        ({"model_flavour": "turbo"}, {}, ["model_flavour", "unknown flavour 'turbo'", '"model_flavour": "edit"']),
        ({"model_flavour": "final"}, {}, ["model_flavour", "text-to-image"]),
        ({}, {"conditioning_data": ["refs-typo"]}, ["conditioning_data", "refs-typo", "ref-images"]),
        ({}, {"conditioning_data": []}, ["edit-images", "conditioning latents missing", "conditioning_data"]),
        ({}, {"cache_dir_vae": "/cache/vae/ref"}, ["share cache_dir_vae", "separate"]),
        ({"aspect_bucket_alignment": 32}, {}, ["aspect_bucket_alignment", "64"]),
        ({}, {"resolution": 700}, ["'resolution'", "700", "off the 64-px grid", "use 704"]),
        ({"validation_resolution": "770x768"}, {}, ["validation_resolution", "770x768", "use 768x768"]),
        ({"learning_rate": "fast"}, {}, ["'learning_rate'", "fast"]),
        ({"lora_rank": 0}, {}, ["'lora_rank'"]),
        ({"lr_scheduler": "sgdr"}, {}, ["'lr_scheduler'", "cosine"]),
        ({"base_model_precision": "fp4"}, {}, ["'base_model_precision'", "int8-torchao", "fp8-matmul"]),
        ({"base_model_precision": "fp8-matmul", "zero_stage": 3}, {}, ["'base_model_precision'", "zero_stage 3", '"zero_stage": 2']),
        ({"base_model_precision": "int8-quanto", "compile": True}, {}, ["'compile'", "int8-torchao", "fp8-matmul"]),
        ({"activation_memory_budget": 0.5, "compile": False}, {}, ["'activation_memory_budget'", '"compile": false', "gradient_checkpointing"]),
        ({"activation_memory_budget": 0.5, "base_model_precision": "int8-quanto"}, {}, ["'activation_memory_budget'", "int8-torchao"]),
        ({"activation_memory_budget": 1.5}, {}, ["activation_memory_budget"]),
        ({"cuda_graphs": True, "compile": False}, {}, ["'cuda_graphs'", '"compile": false', "turn compile on"]),
        ({"cuda_graphs": True, "base_model_precision": "int8-quanto"}, {}, ["'cuda_graphs'", "int8-torchao"]),
        ({"cuda_graphs": True, "offload_activations": "cpu"}, {}, ["'cuda_graphs'", "memory pool", '"offload_activations": "none"']),
        ({"compile_dynamic": False, "compile": False}, {}, ["'compile_dynamic'", '"compile": false', "turn compile on"]),
        ({"offload_activations": "disk"}, {}, ["'offload_activations'", "cpu"]),
        ({"gradient_checkpointing_interval": 0}, {}, ["'gradient_checkpointing_interval'"]),
        ({"attention": "flash3"}, {}, ["'attention'", "cudnn"]),
        ({"profile_steps": [5, 2]}, {}, ["'profile_steps'", "first <= last"]),
        ({}, {"caption_strategy": "instanceprompt"}, ["instance_prompt"]),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, config, edit, expected):
    message = problems_of(write(tmp_path, {**SEED, **config}, backend(**edit)))
    for fragment in expected:
        assert fragment in message
    assert str(tmp_path) in message  # names the file


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, {**SEED, "model_flavour": "dev", "learning_rate": "x"}, backend(resolution=100, conditioning_data=["nope"]))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # flavour, learning_rate, resolution, the unknown id -- and ref-images, no longer linked by anyone,
    # now reads as an edit dataset without references
    assert len(err.value.problems) == 5
    assert sum("'ref-images': no reference dataset linked" in p for p in err.value.problems) == 1


def test_missing_backend_file_and_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data_backend_config": str(tmp_path / "missing.json")}))
    assert "missing.json does not exist" in problems_of(path)
    path.write_text('{"a": 1,,}')
    assert "config.json:1:" in problems_of(path)


def test_reference_captions_warn(tmp_path):
    entries = backend()
    entries[1]["caption_strategy"] = "textfile"
    _, warnings = load_config(write(tmp_path, SEED, entries))
    assert any("ref-images" in w and "replace the edit instructions" in w for w in warnings)


def test_cli_check_exit_codes(tiny, tmp_path, capsys):
    assert main(["config", "check", "--config", str(tiny.config)]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["model_flavour"] == "edit"
    bad = write(tmp_path, {**SEED, "model_flavour": "final"}, backend(conditioning_data=[]))
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "model_flavour" in err and "conditioning latents missing" in err


def test_shipped_examples_are_valid(tmp_path, monkeypatch):
    shutil.copytree(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    shutil.copy("config/config.json.example", "config/config.json")
    shutil.copy("config/multidatabackend.json.example", "config/multidatabackend.json")
    config, _ = load_config("config/config.json")
    assert config.model.model_flavour == "edit" and len(config.data.edit_datasets()) == 1


def test_simpletuners_current_key_names_and_top_level_resolution(tmp_path):
    entries = backend()
    del entries[0]["resolution"]  # takes config.json's top-level default; the reference keeps its own 768
    config, warnings = load_config(write(tmp_path, {**SEED, "checkpoint_step_interval": 250, "validation_step_interval": 50,
                                                    "resolution": 512, "resolution_type": "pixel_area"}, entries))
    assert (config.train.checkpointing_steps, config.validation.steps) == (250, 50)
    resolutions = {d.id: d.resolution for d in config.data.datasets}
    assert resolutions == {"edit-images": 512, "ref-images": 768}
    assert not [w for w in warnings if "not used" in w]
    clash = problems_of(write(tmp_path, {**SEED, "checkpoint_step_interval": 250, "checkpointing_steps": 100}, backend()))
    assert "'checkpoint_step_interval' (250) and 'checkpointing_steps' (100)" in clash


@pytest.mark.parametrize("keys, named", [
    ({"lora_type": "lycoris", "lycoris_config": "config/lycoris_config.json"}, ["'lora_type'", "'lycoris_config'"]),
    ({"grad_clip_method": "value"}, ["'grad_clip_method'", "global L2 norm"]),
    ({"flow_schedule_shift": 3}, ["'flow_schedule_shift'", "resolution-dependent shift"]),
    ({"flow_schedule_auto_shift": False}, ["'flow_schedule_auto_shift'"]),
    ({"peft_lora_mode": "singlora"}, ["'peft_lora_mode'"]),
    ({"lora_init_type": "pissa"}, ["'lora_init_type'"]),
])
def test_keys_that_would_train_differently_are_refused_not_ignored(tmp_path, keys, named):
    text = problems_of(write(tmp_path, {**SEED, **keys}, backend()))
    assert all(name in text for name in named) and "Fix:" in text


def test_keys_that_say_what_longcat_ray_does_anyway_pass_silently(tmp_path):
    keys = {"lora_type": "standard", "grad_clip_method": "norm", "flow_schedule_auto_shift": True, "flow_schedule_shift": 3}
    _, warnings = load_config(write(tmp_path, {**SEED, **keys}, backend()))
    assert not any(key in w for w in warnings for key in keys)


def test_warnings_are_printed_beside_the_errors(tmp_path, capsys):
    bad = write(tmp_path, {**SEED, "grad_clip_method": "value", "push_to_hub": True}, backend())
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "warning:" in err and "'push_to_hub'" in err and "'grad_clip_method'" in err


def test_peft_lora_target_modules_as_json_text_or_file(tmp_path):
    targets = ["attn.to_q", "attn.to_k"]
    config, warnings = load_config(write(tmp_path, {**SEED, "peft_lora_target_modules": json.dumps(targets)}, backend()))
    assert config.lora.target_modules == targets and not [w for w in warnings if "target_modules" in w]
    (tmp_path / "targets.json").write_text(json.dumps(targets))
    config, _ = load_config(write(tmp_path, {**SEED, "peft_lora_target_modules": str(tmp_path / "targets.json")}, backend()))
    assert config.lora.target_modules == targets
    text = problems_of(write(tmp_path, {**SEED, "peft_lora_target_modules": str(tmp_path / "missing.json")}, backend()))
    assert "'peft_lora_target_modules'" in text and "No such file" in text


def test_a_reference_can_name_its_edit_dataset(tmp_path):
    """SimpleTuner's source_dataset_id on the reference dataset links the pair as conditioning_data does."""
    entries = backend(conditioning_data=[])
    entries[1].update(dataset_type="conditioning", conditioning_type="reference_strict", source_dataset_id="edit-images")
    config, warnings = load_config(write(tmp_path, SEED, entries))
    assert config.data.edit_datasets()[0].conditioning_data == ["ref-images"] and not warnings
    entries[1]["source_dataset_id"] = "edits"
    assert "'source_dataset_id' names 'edits'" in problems_of(write(tmp_path, SEED, entries))


@pytest.mark.parametrize("kind, named", [
    ("reference_loose", "'conditioning_type': 'reference_loose'"),
    ("controlnet", "not an edit reference"),
])
def test_reference_kinds_longcat_cannot_train_are_refused_by_key(tmp_path, kind, named):
    entries = backend()
    entries[1]["conditioning_type"] = kind
    text = problems_of(write(tmp_path, SEED, entries))
    assert named in text and "Fix:" in text


def test_lora_format_is_simpletuners_key(tmp_path):
    config, _ = load_config(write(tmp_path, {**SEED, "lora_format": "comfyui"}, backend()))
    assert config.lora.format == "comfyui"
    assert "'lora_format'" in problems_of(write(tmp_path, {**SEED, "lora_format": "kohya"}, backend()))


def test_a_null_model_path_is_the_edit_flavours_hub_id(tmp_path):
    config, _ = load_config(write(tmp_path, {**SEED, "pretrained_model_name_or_path": None}, backend()))
    assert config.model.pretrained_model_name_or_path == "meituan-longcat/LongCat-Image-Edit"


def test_other_models_embedding_caches_are_ignored_with_a_reason(tmp_path):
    entries = backend() + [{"id": "qwen-cond-embeds", "type": "local", "dataset_type": "conditioning_image_embeds",
                            "cache_dir": "/cache/cond_embeds"}]
    config, warnings = load_config(write(tmp_path, SEED, entries))
    assert [d.id for d in config.data.edit_datasets()] == ["edit-images"]
    assert any("qwen-cond-embeds" in w and "Not used (ignored)" in w for w in warnings)


def test_several_references_are_sampled_not_stitched(tmp_path):
    assert "'conditioning_multidataset_sampling'" in problems_of(
        write(tmp_path, {**SEED, "conditioning_multidataset_sampling": "combined"}, backend()))
    load_config(write(tmp_path, {**SEED, "conditioning_multidataset_sampling": "random"}, backend()))


def test_eval_dataset_id_names_an_edit_dataset(tmp_path):
    from longcat_ray.pairs import evaluation_rows

    config, _ = load_config(write(tmp_path, {**SEED, "eval_dataset_id": "edit-images"}, backend()))
    rows = [{"sample_id": "z", "dataset_id": "edit-images"}, {"sample_id": "a", "dataset_id": "other"}]
    assert [r["sample_id"] for r in evaluation_rows(rows, config)] == ["z"]
    text = problems_of(write(tmp_path, {**SEED, "eval_dataset_id": "ref-images"}, backend()))
    assert "'eval_dataset_id'" in text and "['edit-images']" in text
