import pytest
import torch

from tinyrecipe.model import PRESETS, Llama, ModelConfig

pytestmark = pytest.mark.fast  # make test-fast


def test_tinyllama_preset_has_exactly_the_papers_parameter_count():
    config = ModelConfig.from_name("tinyllama-1.1b")
    assert (config.n_layer, config.d_model, config.n_head, config.n_kv_head) == (22, 2048, 32, 4)
    assert (config.d_ff, config.vocab_size, config.block_size) == (5632, 32000, 2048)
    assert (config.rope_theta, config.norm_eps, config.tie_embeddings) == (10000.0, 1e-5, False)
    assert config.num_params() == 1_100_048_384
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_formula_matches_every_preset(name):
    config = PRESETS[name]
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    table = config.vocab_size * config.d_model
    assert config.num_params(embedding=False) == config.num_params() - table


def test_tied_embeddings_count_once():
    config = ModelConfig.from_name("tiny", tie_embeddings=True)
    model = Llama(config)
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert config.num_params(embedding=False) == config.num_params()


def test_shape_rules_reproduce_tinyllama():
    assert ModelConfig.from_shape(2048, 22) == ModelConfig()


def test_ladder_sizes_are_as_named():
    expected = {"llama-20m": 20e6, "llama-60m": 60e6, "llama-160m": 160e6, "llama-410m": 410e6}
    for name, size in expected.items():
        assert abs(PRESETS[name].num_params() / size - 1) < 0.1, name


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tinyllama-1.1b"):
        ModelConfig.from_name("nope")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_head": 30}, "not divisible by n_head"),
        ({"n_kv_head": 3}, "not a multiple of n_kv_head"),
        ({"attention": "xformers"}, "attention='xformers' is unknown"),
        ({"n_layer": 0}, "n_layer=0 must be positive"),
    ],
)
def test_bad_shapes_fail_with_the_field_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)
