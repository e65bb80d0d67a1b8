"""SFT data (template, masking, bad records, packing), the notebook API and the finetune recipe."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, quiet_trainer
from tinyrecipe.data.sft import (
    IGNORE_INDEX,
    BadRecord,
    SFTDataModule,
    collate,
    encode,
    format_prompt,
    pack,
    render,
)
from tinyrecipe.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus["root"] / "tok")


def test_loss_is_on_the_response_and_its_eos_only(tok):
    record = {"prompt": "What is len?", "response": "The number of items."}
    ids, labels = encode(record, tok, 256)
    prompt_ids = tok.encode(format_prompt("What is len?"))
    response_ids = tok.encode("The number of items.")
    assert ids == [tok.bos_id] + prompt_ids + response_ids  # the final </s> is only a target
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained == response_ids + [tok.eos_id]
    assert labels[: len(prompt_ids) - 1] == [IGNORE_INDEX] * (len(prompt_ids) - 1)
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and i + 1 < len(ids):  # a label is the next input token
            assert label == ids[i + 1]


def test_messages_with_system_and_two_turns(tok):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    pieces = render(record)
    assert [trained for _, trained in pieces] == [False, True, False, True]
    assert pieces[0][0] == format_prompt("Hi", system="Be brief.")
    _, labels = encode(record, tok, 256)
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained == tok.encode("Hello.") + [tok.eos_id] + tok.encode("Goodbye.") + [tok.eos_id]


def test_alpaca_and_sharegpt_records_render_as_their_messages():
    alpaca = {"instruction": "Add the numbers.", "input": "2 + 2", "output": "4"}
    assert render(alpaca) == render({"prompt": "Add the numbers.\n\n2 + 2", "response": "4"})
    assert render({**alpaca, "input": ""}) == render(
        {"prompt": "Add the numbers.", "response": "4"}
    )
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ]
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert render(sharegpt) == render({"messages": messages})


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "x"}, "missing or non-string response"),
        ({"prompt": "x", "response": 3}, "missing or non-string response"),
        ({"text": "x"}, "none of prompt/response, messages, instruction/output or conversations"),
        ({"instruction": "x"}, "missing or non-string output"),
        ({"instruction": "x", "input": 3, "output": "y"}, "non-string input"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
        ({"conversations": ["x"]}, "a conversation turn that is not an object"),
        ({"messages": []}, "messages is not a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"prompt": "x", "response": "  "}, "empty response"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_bad_records_say_why(record, reason, tok):
    with pytest.raises(BadRecord, match=reason):
        encode(record, tok, 64)


def test_a_prompt_longer_than_the_context_is_skipped(tok):
    with pytest.raises(BadRecord, match="no response token fits"):
        encode({"prompt": "word " * 200, "response": "yes"}, tok, 32)


def test_packing_makes_full_blocks_and_keeps_labels():
    examples = [([1, 2, 3], [2, 3, -100]), ([4, 5], [5, 6]), ([7, 8, 9, 10], [8, -100, 10, 11])]
    blocks = pack(examples, 4)
    assert blocks == [([1, 2, 3, 4], [2, 3, -100, 5]), ([5, 7, 8, 9], [6, 8, -100, 10])]


@pytest.mark.parametrize("positions", ["restart", "continue"])
def test_packed_examples_with_document_mask_score_as_if_alone(corpus, tok, positions):
    """`packing` + `document_mask`: whole examples per row, each attending only to itself, so a
    packed row's logits equal each example's run alone."""
    from tinyrecipe.model import Llama, ModelConfig

    records = [
        {"prompt": f"What does f{i}() do?", "response": "It counts " + "items " * i}
        for i in range(10)
    ]
    dm = SFTDataModule(
        records=records,
        tokenizer_dir=str(corpus["root"] / "tok"),
        block_size=128,
        batch_size=2,
        packing=True,
        document_mask=True,
        val_fraction=0.0,
    )
    dm.setup("fit")
    alone = [encode(r, tok, 128) for r in records]
    rows = dm.train_examples
    assert 1 < len(rows) < len(alone) and all(len(ids) <= 128 for ids, _, _ in rows)
    placed = [
        (ids[docs.index(d) : len(docs) - docs[::-1].index(d)])
        for ids, _, docs in rows
        for d in sorted(set(docs))
    ]
    assert placed == [ids for ids, _ in alone]  # whole, in order, none split
    batch = next(iter(dm.train_dataloader()))
    assert batch["documents"].shape == batch["input_ids"].shape

    torch.manual_seed(0)
    shape = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=176, vocab_size=1024)
    model = Llama(ModelConfig(**shape, block_size=128, document_positions=positions)).eval()
    packed = collate(rows, dm.pad_id)
    with torch.no_grad():
        logits = model(packed["input_ids"], documents=packed["documents"]).logits
        k = 0
        for r, (_, _, docs) in enumerate(rows):
            for d in sorted(set(docs)):
                start, n = docs.index(d), docs.count(d)
                own = model(torch.tensor([alone[k][0]])).logits[0]
                torch.testing.assert_close(logits[r, start : start + n], own, atol=1e-5, rtol=1e-5)
                k += 1
    with pytest.raises(ValueError, match="data.document_mask needs data.packing: true"):
        SFTDataModule(records=records, tokenizer_dir="x", document_mask=True)


def test_datamodule_counts_bad_lines_splits_and_pads(corpus, tmp_path):
    path = tmp_path / "sft.jsonl"
    good = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(40)]
    lines = [json.dumps(r) for r in good] + ["{not json", json.dumps({"prompt": "only"}), ""]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    dm = SFTDataModule(
        train_file=str(path),
        tokenizer_dir=str(corpus["root"] / "tok"),
        val_fraction=0.2,
        block_size=64,
        batch_size=4,
        vocab_size=1024,
    )
    with pytest.warns(UserWarning, match="skipped 3 record"):
        dm.setup("fit")
    assert dm.skipped == {
        "malformed JSON": 1,
        "missing or non-string response": 1,
        "non-UTF-8 line": 1,
    }
    assert len(dm.train_examples) + len(dm.val_examples) == 40 and dm.val_examples
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].size(0) == 4
    lengths = (batch["labels"] != IGNORE_INDEX).sum(1)
    assert (lengths > 0).all()
    with pytest.raises(ValueError, match="has 1024 tokens but the model only 512"):
        SFTDataModule(
            records=good, tokenizer_dir=str(corpus["root"] / "tok"), vocab_size=512
        ).setup("fit")
    with pytest.raises(ValueError, match="no usable training example"):
        SFTDataModule(records=[{"prompt": "x"}], tokenizer_dir=str(corpus["root"] / "tok")).setup(
            "fit"
        )
    with pytest.raises(ValueError, match="exactly one of data.train_file or data.records"):
        SFTDataModule(tokenizer_dir="x")


def _tiny_hf_model(path, vocab_size):
    """A random Hugging Face Llama directory (no hub): the notebook's starting point."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_notebook_api_fine_tunes_a_hf_model_until_it_answers(corpus, tmp_path):
    from tinyrecipe.train.finetune import answer, load_pretrained, sft_data

    tok_dir = corpus["root"] / "tok"
    hf_dir = _tiny_hf_model(tmp_path / "hf", 1024)
    records = [
        {"prompt": "What does len do?", "response": "It counts items."},
        {"prompt": "What does abs do?", "response": "It drops the sign."},
    ]
    module = load_pretrained(
        hf_dir, optimizer={"lr": 1e-2}, schedule={"min_lr": 1e-3, "warmup_steps": 2}
    )
    data = sft_data(records * 8, tok_dir, block_size=64, batch_size=4, val_fraction=0.0)
    trainer = quiet_trainer(max_steps=60)
    trainer.fit(module, data)
    assert answer(module, tok_dir, "What does len do?", max_new_tokens=12) == "It counts items."
    assert answer(module, tok_dir, "What does abs do?", max_new_tokens=12) == "It drops the sign."


def test_lora_trains_only_its_adapters_and_reads_back_merged(corpus, tmp_path, capsys):
    """LoRA through the notebook API: the base weights stay bitwise, the adapters learn the
    answer, and a checkpoint reads back (convert, eval, generate, init_from) as the plain decoder
    with the adapters merged, equal to the adapted model."""
    from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint, save_tinyrecipe_checkpoint
    from tinyrecipe.model import Llama
    from tinyrecipe.model.lora import merged_state_dict
    from tinyrecipe.train.finetune import answer, load_pretrained, sft_data

    tok_dir = corpus["root"] / "tok"
    hf_dir = _tiny_hf_model(tmp_path / "hf", 1024)
    records = [{"prompt": "What does len do?", "response": "It counts items."}]
    module = load_pretrained(
        hf_dir,
        optimizer={"lr": 3e-2},
        schedule={"min_lr": 3e-3, "warmup_steps": 2},
        lora={"rank": 8, "alpha": 16},
    )
    data = sft_data(  # packed whole, each copy attending only to itself
        records * 16,
        tok_dir,
        block_size=64,
        batch_size=2,
        val_fraction=0.0,
        packing=True,
        document_mask=True,
    )
    trainer = quiet_trainer(max_steps=30)
    trainer.fit(module, data)
    _, base = load_tinyrecipe_checkpoint(hf_dir)
    state = module.model.state_dict()
    adapters = {k for k in state if k.endswith((".lora_a", ".lora_b"))}
    assert len(adapters) == 2 * 4 * 2  # A and B on 4 linear layers of 2 blocks
    assert set(state) - adapters == set(base)
    assert all(torch.equal(state[k], base[k]) for k in base)  # frozen: bitwise unchanged
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in module.model.named_parameters() if n in adapters}
    assert answer(module, tok_dir, "What does len do?", max_new_tokens=12) == "It counts items."

    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    config, merged = load_tinyrecipe_checkpoint(path)
    assert set(merged) == set(base)
    assert not torch.equal(merged["blocks.0.mlp.proj.weight"], base["blocks.0.mlp.proj.weight"])
    from_model = merged_state_dict(module.model)  # the notebook's save, same merge
    assert all(torch.equal(from_model[k], merged[k]) for k in merged)
    with pytest.raises(ValueError, match=r"save merged_state_dict\(model\)"):
        save_tinyrecipe_checkpoint(config, state, tmp_path / "raw.ckpt")
    plain = Llama(config).eval()
    plain.load_state_dict(merged)
    idx = torch.randint(0, 1024, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(idx).logits, module.model.eval()(idx).logits, atol=1e-5, rtol=1e-5
        )

    # the fine-tuned checkpoint answers from the command line too, in the SFT template
    from tinyrecipe.cli import main as cli_main

    capsys.readouterr()
    args = ["generate", "--ckpt", str(path), "--tokenizer", str(tok_dir), "--chat"]
    args += ["--prompt", "What does len do?", "--temperature", "0", "--max-new-tokens", "12"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out == "It counts items.\n"

    # the adapters alone, as a PEFT adapter on the Hugging Face base model
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from tinyrecipe.interop.convert import to_peft

    adapter = to_peft(path, tmp_path / "adapter", str(hf_dir))
    assert (adapter / "adapter_model.safetensors").stat().st_mode & 0o777 == (
        adapter / "adapter_config.json"
    ).stat().st_mode & 0o777  # not safetensors' own 0600
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(hf_dir), adapter)
    with torch.no_grad():
        theirs = peft_model.eval()(idx).logits
        torch.testing.assert_close(theirs, module.model(idx).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds no LoRA adapters .* convert to-hf"):
        to_peft(hf_dir, tmp_path / "none")
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(
        ValueError, match="trained with LoRA rank 8, alpha 16, .* the recipe says off"
    ):
        load_pretrained(hf_dir).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="trained with LoRA rank 8, .* the recipe says rank 4"):
        load_pretrained(hf_dir, lora={"rank": 4, "alpha": 16}).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="model.lora.targets .* must be a non-empty list of"):
        load_pretrained(hf_dir, lora={"rank": 8, "targets": ["attn.q"]})
    with pytest.raises(
        ValueError, match="model.speed.float8 and model.lora.rank cannot be combined"
    ):
        load_pretrained(hf_dir, lora={"rank": 8}, speed={"float8": True})
    with pytest.raises(ValueError, match="model.lora.rank=0 must be a positive integer"):
        load_pretrained(hf_dir, lora={"rank": 0})


def test_sft_resumes_mid_epoch_exactly_on_any_micro_batch_size(corpus, tmp_path):
    """Stopped in its second epoch and resumed from a checkpoint saved there (as ModelCheckpoint
    saves), an SFT run ends bitwise equal to the uninterrupted run; resumed with micro-batches of
    8 instead of 4 x 2 (the same global batch), it takes the same epochs and batch indices and
    ends equal to float rounding."""
    import lightning as L

    from tinyrecipe.train.finetune import load_pretrained, sft_data

    hf_dir = _tiny_hf_model(tmp_path / "hf", 1024)
    records = [
        {"prompt": f"What does f{i}() do?", "response": "It counts " + "items " * i}
        for i in range(24)
    ]  # 3 steps of 8 rows an epoch

    class SaveAtStep4(L.Callback):
        def __init__(self):
            self.batches = []  # (epoch, batch_idx) of each micro-batch from step 4 on

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step >= 4:
                self.batches.append((trainer.current_epoch, batch_idx))

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4 and not (tmp_path / "step4.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "step4.ckpt")

    def run(steps, batch_size, ckpt_path=None):
        module = load_pretrained(
            hf_dir, optimizer={"lr": 1e-2}, schedule={"warmup_steps": 2, "max_steps": 8}
        )
        data = sft_data(
            records, corpus["root"] / "tok", block_size=64, batch_size=batch_size, val_fraction=0
        )
        saver = SaveAtStep4()
        trainer = quiet_trainer(
            max_steps=steps, accumulate_grad_batches=8 // batch_size, callbacks=[saver]
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer, module.model.state_dict(), saver.batches

    run(4, 4)
    state = torch.load(tmp_path / "step4.ckpt", weights_only=False)["SFTDataModule"]
    assert state["samples_consumed"] == 32
    whole, weights, batches = run(8, 4)
    for batch_size in (4, 8):
        trainer, resumed, seen = run(8, batch_size, tmp_path / "step4.ckpt")
        assert trainer.global_step == 8 and trainer.current_epoch == whole.current_epoch
        assert seen == (batches if batch_size == 4 else [(e, i // 2) for e, i in batches[::2]])
        for key in weights:
            if batch_size == 4:
                assert torch.equal(resumed[key], weights[key]), key
            else:
                torch.testing.assert_close(resumed[key], weights[key], atol=1e-5, rtol=1e-4)


def test_fabric_loop_fine_tunes_like_the_trainer_across_epochs(corpus, tmp_path):
    """The Fabric loop on SFT data: the Trainer's loss sequence (1e-5), over 3 epochs of rows."""
    import lightning as L

    from tinyrecipe.train.fabric import train
    from tinyrecipe.train.finetune import load_pretrained

    hf_dir = _tiny_hf_model(tmp_path / "hf", 1024)
    records = [
        {"prompt": f"What does f{i}() do?", "response": "It counts " + "items " * i}
        for i in range(8)
    ]  # 2 micro-batches of 4 an epoch
    model = dict(
        optimizer={"lr": 1e-2}, schedule={"min_lr": 1e-3, "warmup_steps": 2, "max_steps": 6}
    )
    data = dict(records=records, tokenizer_dir=str(corpus["root"] / "tok"), block_size=64)
    data |= dict(batch_size=4, val_fraction=0.0)

    class Losses(L.Callback):
        values: list = []

        def on_train_batch_end(self, trainer, *args):
            self.values.append(float(trainer.callback_metrics["train/loss"]))

    module = load_pretrained(hf_dir, **model)
    trainer = quiet_trainer(max_steps=6, log_every_n_steps=1, callbacks=[Losses()])
    L.seed_everything(0)
    trainer.fit(module, SFTDataModule(**data))
    root = str(tmp_path / "fabric")
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "default_root_dir": root},
        "model": dict(module.hparams),
        "data": {"class_path": "tinyrecipe.data.sft.SFTDataModule", "init_args": data},
    }
    losses = train(recipe)
    assert len(Losses.values) == len(losses) == 6
    assert losses == pytest.approx(Losses.values, abs=1e-5)


def test_finetune_recipe_runs_from_a_converted_checkpoint(corpus, tmp_path):
    """The recipe as a user runs it, on a HF model converted with `tinyrecipe convert from-hf`."""
    hf_dir = _tiny_hf_model(tmp_path / "hf", 1024)
    ckpt = tmp_path / "start.ckpt"
    subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", "convert", "from-hf", str(hf_dir), str(ckpt)],
        check=True,
        capture_output=True,
    )
    sft = tmp_path / "sft.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "data_prep/make_sft_sample.py"), "--out", str(sft)]
        + ["--max-records", "200"],
        check=True,
        capture_output=True,
    )
    shape = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "d_ff": 176}
    shape |= {"vocab_size": 1024, "block_size": 128}
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tinyrecipe.cli", "fit"]
        + ["--config", str(ROOT / "recipes/finetune/quickstart-sft.yaml")]
        + ["--model.config", json.dumps(shape), "--model.init_from", str(ckpt)]
        + ["--data.train_file", str(sft), "--data.tokenizer_dir", str(corpus["root"] / "tok")]
        + ["--data.block_size", "128", "--trainer.max_steps", "6"]
        + ["--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1"]
        + ["--trainer.default_root_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from tests.test_training import scalars

    logged = scalars(out / "tensorboard")
    steps = [s for s, _ in logged["val/loss"]]
    assert len(steps) == 3 and steps[0] == 0  # the step-0 evaluation, then every 3 steps
    assert "val/loss/sft" in logged and "train/loss" in logged
    assert (out / "checkpoints/last.ckpt").is_file()  # under the one output directory


def test_a_step_is_normalised_by_the_global_target_tokens(tmp_path):
    """SFT losses per target token over the whole step: 2 FSDP2 processes x 4 micro-batches with
    1 to 24 target tokens per row take the same loss, norm and gradients (1e-5) as one process
    with the whole batch in one micro-batch (a mean per micro-batch would not)."""
    out = tmp_path / "step.json"
    script = ROOT / "tests/helpers/per_token_step.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out), "2", "4"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    sharded, whole = result["sharded"], result["whole"]
    assert sharded["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert sharded["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(
            torch.tensor(sharded["grads"][name]), torch.tensor(grad), atol=1e-5, rtol=0
        )


@pytest.mark.fast
def test_an_sft_epoch_is_whole_global_batches_on_any_split_of_them():
    """1000 rows in global batches of 64, as 4 x 8 processes x 2 accumulated or 8 x 8 x 1: the
    same 960 rows an epoch in the same order, and every epoch ends on an optimizer step."""
    from tinyrecipe.data.sft import SFTStream

    rows = list(range(1000))
    small = SFTStream(rows, 0, batch_size=4, rank=0, world_size=8, accumulate=2)
    large = SFTStream(rows, 0, batch_size=8, rank=0, world_size=8, accumulate=1)
    assert small.per_epoch * 4 * 8 == large.per_epoch * 8 * 8 == 960
    assert small.per_epoch % 2 == 0
    assert [small.row(i) for i in range(2000)] == [large.row(i) for i in range(2000)]


def test_an_sft_resume_whose_epochs_differ_is_refused(corpus):
    """A checkpoint whose epochs held other rows (another global batch, or an older checkpoint
    with accumulation, whose epochs were whole micro-batches) would map its samples to other
    rows: refused in one line."""
    records = [{"prompt": f"f{i}?", "response": "It counts."} for i in range(10)]
    options = dict(records=records, tokenizer_dir=str(corpus["root"] / "tok"), val_fraction=0.0)

    def data(batch_size, accumulate=1, **more):
        dm = SFTDataModule(**options, batch_size=batch_size, **more)
        dm.setup("fit")
        dm.set_rank_world(0, 1, accumulate)
        return dm

    state = data(2, 2).state_dict()  # 10 rows in global batches of 4: epochs of 8
    assert state["epoch_rows"] == 8
    data(4).load_state_dict(state)  # the same global batch, split otherwise
    older = {k: v for k, v in state.items() if k != "epoch_rows"}  # epochs of 10 (5 x 2)
    with pytest.raises(ValueError, match="SFT epochs hold 10 rows, this run's 8"):
        data(2, 2).load_state_dict(older)
    with pytest.raises(ValueError, match="SFT epochs hold 8 rows, this run's 9"):
        data(3, allow_global_batch_change=True).load_state_dict(state)


def test_sft_validation_counts_each_example_once_on_any_number_of_ranks(corpus):
    """Four ranks share 9 validation examples: each is scored once, the shares padded with
    examples that have no target (not repeated examples, which would weigh some twice)."""
    records = [{"prompt": f"f{i}?", "response": "It counts " + "x " * i} for i in range(40)]
    dm = SFTDataModule(
        records=records, tokenizer_dir=str(corpus["root"] / "tok"), batch_size=2, val_fraction=0.25
    )
    dm.setup("fit")

    def targets(rank, world):
        dm.set_rank_world(rank, world, 1)
        batches = list(dm.val_dataloader())
        return len(batches), sum(int((b["labels"] != -100).sum()) for b in batches)

    one = targets(0, 1)
    shares = [targets(r, 4) for r in range(4)]
    assert len({n for n, _ in shares}) == 1  # every rank runs as many batches
    assert sum(t for _, t in shares) == one[1] and len(dm.val_examples) % 4
