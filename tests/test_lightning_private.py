"""Every Lightning private that `tinyrecipe._lightning` uses, checked against the installed
Lightning: a version that renames or reshapes one fails here, in one place."""

import inspect

import lightning as L
import pytest
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops import _TrainingEpochLoop
from lightning.pytorch.strategies import ModelParallelStrategy

from tinyrecipe import _lightning
from tinyrecipe.train.callbacks import Checkpoints


@pytest.fixture(scope="module")
def trainer():
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=1)


def test_the_loops_privates(trainer):
    loop = trainer.fit_loop.epoch_loop
    assert isinstance(loop, _TrainingEpochLoop)
    assert callable(trainer.fit_loop._should_accumulate)
    assert isinstance(loop._batches_that_stepped, int)
    assert _lightning.steps_logged_at(trainer) == 0
    assert callable(loop._broadcast_sigterm_tensor)
    assert inspect.signature(loop._broadcast_sigterm_tensor).parameters == {}
    _lightning.check_sigterm_at_logging_steps(trainer)
    assert loop._broadcast_sigterm_tensor._at_logging_steps
    assert _lightning.batches_processed(trainer) == 0
    loops = (loop.val_loop, trainer.validate_loop, trainer.test_loop)
    assert all(isinstance(evaluation.inference_mode, bool) for evaluation in loops)
    _lightning.validate_without_inference_mode(trainer)
    assert not any(evaluation.inference_mode for evaluation in loops)
    connector = trainer._logger_connector
    assert isinstance(connector.should_update_logs, bool) and callable(connector.log_metrics)


def test_the_saved_batch_progress_schema(trainer):
    state = trainer.fit_loop.state_dict()
    progress = state["epoch_loop.batch_progress"]
    for counters in (progress["total"], progress["current"]):
        assert set(counters) == {"ready", "started", "processed", "completed"}
    checkpoint = {"loops": {"fit_loop": state}}
    progress["total"].update(ready=5, started=5, processed=4, completed=4)
    progress["current"].update(ready=3, started=3, processed=2, completed=2)  # a second epoch
    _lightning.restate_batch_progress(checkpoint, 10)
    assert progress["total"] == {"ready": 11, "started": 11, "processed": 10, "completed": 10}
    assert progress["current"] == {"ready": 6, "started": 6, "processed": 5, "completed": 5}
    assert _lightning.saved_batches_processed(checkpoint) == 10
    with pytest.raises(ValueError, match="stopped 5 of its 10 micro-batches into its epoch"):
        _lightning.restate_batch_progress(checkpoint, 3)


@pytest.mark.parametrize("cls", [ModelParallelStrategy, FabricModelParallel])
def test_model_parallel_strategies_resolve_auto_from_their_attribute(cls):
    extra = {"parallelize_fn": lambda module, mesh: module} if cls is FabricModelParallel else {}
    strategy = cls(data_parallel_size="auto", tensor_parallel_size=1, **extra)
    assert strategy._data_parallel_size == "auto" and strategy._tensor_parallel_size == 1
    assert "_data_parallel_size" in inspect.getsource(cls.setup_environment)


def test_the_sharded_metadata_file_and_an_attached_trainer(trainer):
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    assert _METADATA_FILENAME == _lightning.SHARDED_METADATA_FILE
    module = L.LightningModule()
    assert _lightning.attached_trainer(module) is None
    module.trainer = trainer
    assert _lightning.attached_trainer(module) is trainer


def test_model_checkpoint_privates():
    callback = Checkpoints(every_n_train_steps=1)
    assert callback._last_global_step_saved == 0
    for name in ("_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint"):
        assert callable(getattr(ModelCheckpoint, name)), name
    params = list(inspect.signature(ModelCheckpoint._link_checkpoint).parameters)
    assert params == ["trainer", "filepath", "linkpath"]
    assert "_link_checkpoint" in inspect.getsource(ModelCheckpoint._save_last_checkpoint)


def test_the_process_group_settings_of_each_multi_process_strategy():
    from datetime import timedelta

    from lightning.fabric.strategies import DDPStrategy as FabricDDP
    from lightning.fabric.utilities.distributed import _init_dist_connection
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    timeout = timedelta(seconds=42)
    extra = {"parallelize_fn": lambda module, mesh: module}
    strategies = [
        DDPStrategy(timeout=timeout, process_group_backend="gloo"),
        ModelParallelStrategy(timeout=timeout, process_group_backend="gloo"),
        FabricDDP(timeout=timeout, process_group_backend="gloo"),
        FabricModelParallel(timeout=timeout, process_group_backend="gloo", **extra),
    ]
    for strategy in strategies:
        assert _lightning.process_group_settings(strategy) == ("gloo", timeout), strategy
        assert "_init_dist_connection" in inspect.getsource(type(strategy))
    # which leaves a process group started before it (tinyrecipe.train.elastic) as it is
    assert "if torch.distributed.is_initialized():" in inspect.getsource(_init_dist_connection)
    assert _lightning.process_group_settings(SingleDeviceStrategy("cpu")) is None
