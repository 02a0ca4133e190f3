"""The Accelerate configs in examples/accelerate/ read as `accelerate launch` 1.15 reads them.

Accelerate's loader (`load_config_from_file`, a `ClusterConfig`) refuses an unknown top-level key,
but copies the keys under `fsdp_config` and `deepspeed_config` onto the launcher's options without
checking them, so a misspelt one there would be dropped in silence: those are checked against the
launcher's own options here. Each file then goes through the launcher's resolution
(`_validate_launch_command` and the environment it hands the processes), and the FSDP and
DeepSpeed plugins are built from that environment as each process builds them. None of it needs
a GPU or DeepSpeed (only DeepSpeed's engine would); nothing is launched.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils import launch as launch_utils

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate"
KINDS = {
    "ddp": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "deepspeed-zero2": DistributedType.DEEPSPEED,
    "deepspeed-zero3": DistributedType.DEEPSPEED,
    "multi-node": DistributedType.MULTI_GPU,
}


def _unknown_nested_keys(cfg: ClusterConfig) -> list[str]:
    """Keys of `fsdp_config` / `deepspeed_config` that are no `accelerate launch` option (the
    launcher prefixes `fsdp_` to an FSDP key that lacks it, as in `_validate_launch_command`)."""
    options = {action.dest for action in launch_command_parser()._actions}
    names = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config]
    return [k for k in [*names, *cfg.deepspeed_config] if k not in options]


def _launch_env(config: str | Path) -> tuple[dict[str, str], object]:
    """The environment `accelerate launch --config_file <config> -m lfm ...` gives each
    process, and the launcher's resolved options (`config`: a shipped name or a path)."""
    path = config if isinstance(config, Path) else CONFIGS / f"{config}.yaml"
    argv = ["--config_file", str(path), "-m", "lfm", "tuning", "train"]
    args, defaults, mixed_from_file = _validate_launch_command(
        launch_command_parser().parse_args(argv)
    )
    with mock.patch.object(launch_utils, "is_port_in_use", return_value=False):
        if not args.use_deepspeed:
            return launch_utils.prepare_multi_gpu_env(args), args
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if mixed_from_file else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as `launch_command`
        return launch_utils.prepare_deepspeed_cmd_env(args)[1], args


def test_every_config_is_shipped_and_documented():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(KINDS)
    for name in KINDS:
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert text.startswith("# ")  # the comment block: what it is for, the command, the edits
        head = text.split("\ncompute_environment")[0]
        for command in ("tuning train", "tuning sft", "distill lm"):
            assert f"--config_file examples/accelerate/{name}.yaml -m lfm {command}" in head


@pytest.mark.parametrize("name", sorted(KINDS))
def test_accelerates_loader_reads_the_config(name):
    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig) and cfg.distributed_type == KINDS[name]
    assert _unknown_nested_keys(cfg) == []
    assert cfg.num_processes >= 2 and not cfg.use_cpu


def test_a_misspelt_key_is_refused(tmp_path):
    bad = tmp_path / "ddp.yaml"
    bad.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_processes:", "num_proceses:"))
    with pytest.raises(ValueError, match=r"unknown keys \(\['num_proceses'\]\)"):
        load_config_from_file(str(bad))
    # under fsdp_config Accelerate's loader lets it through; the check above does not
    cfg = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    cfg["fsdp_config"]["fsdp_state_dict_typ"] = cfg["fsdp_config"].pop("fsdp_state_dict_type")
    nested = tmp_path / "fsdp.yaml"
    nested.write_text(yaml.safe_dump(cfg))
    assert _unknown_nested_keys(load_config_from_file(str(nested))) == ["fsdp_state_dict_typ"]


@pytest.mark.parametrize("name", ["ddp", "multi-node"])
def test_the_launcher_starts_the_processes_the_file_asks_for(name):
    env, args = _launch_env(name)
    assert args.module and args.multi_gpu and env["ACCELERATE_MIXED_PRECISION"] == "no"
    if name == "ddp":
        assert args.nproc_per_node == "2" and args.num_machines == 1
    else:  # 16 processes over 2 machines, meeting at the main machine's address
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
        assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "static"


def test_the_fsdp_plugin_is_full_shard_by_decoder_layer_with_a_full_state_dict():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env, args = _launch_env("fsdp")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_plugin_reads_its_json_with_a_fixed_micro_batch(stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(ROOT)  # the yaml names the JSON file relative to the repository root
    env, args = _launch_env(f"deepspeed-zero{stage}")
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.zero3_init_flag is False
    # lfm's loop prepares no DataLoader: an "auto" micro-batch would be refused at `prepare`
    assert isinstance(plugin.deepspeed_config["train_micro_batch_size_per_gpu"], int)
    assert plugin.gradient_accumulation_steps == 1  # lfm accumulates itself; see docs/tuning.md
    assert plugin.zero3_save_16bit_model is (stage == 3)


@pytest.mark.parametrize("key", ["zero3_save_16bit_model", "mixed_precision"])
def test_a_setting_beside_the_deepspeed_json_file_is_refused(key, tmp_path):
    """Why the ZeRO-3 file sets `stage3_gather_16bit_weights_on_model_save` in its JSON, and the
    DeepSpeed files have no `mixed_precision`: Accelerate refuses either next to a JSON file."""
    from accelerate.utils import DeepSpeedPlugin

    cfg = yaml.safe_load((CONFIGS / "deepspeed-zero3.yaml").read_text())
    if key == "mixed_precision":
        cfg["mixed_precision"] = "no"
    else:
        cfg["deepspeed_config"][key] = True
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(CONFIGS / "deepspeed-zero3.json")
    path = tmp_path / "deepspeed-zero3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env, _ = _launch_env(path)
    with mock.patch.dict(os.environ, env, clear=True), pytest.raises(ValueError, match="ignored"):
        DeepSpeedPlugin()
