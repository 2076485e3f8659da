"""Hugging Face architectures as a user brings them, built from small configs with random weights (no downloads):
each quantizes from the dict form the README shows (`{"pixel_values": ...}`, `{"input_ids": ..., "attention_mask":
...}`: the model itself, no wrapper), exports through the direct ONNX emitter with the inputs and outputs named as
the model names them, matches its PyTorch simulation on ONNX Runtime, and runs >= 90% of its conv/linear/matmul
multiply-accumulates in int8 (attention products included)."""

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from eightbit import quantize  # noqa: E402
from eightbit.config import OpKind  # noqa: E402
from eightbit.export.onnx import DIRECT  # noqa: E402
from eightbit.inputs import CACHE_NOTE  # noqa: E402

T = transformers


def _images(seed: int):
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _tokens(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _image_model(model, output="logits"):
    _settle_batchnorms(model)
    return model, _images, output


def _settle_batchnorms(model: nn.Module) -> None:
    """Give BatchNorms the statistics of their inputs (as training would): with freshly initialised running
    statistics (and an eps far above the variances of a random net), activations of a deep random CNN shrink
    to ~1e-30 or 0 and nothing meaningful is left to compare."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for seed in range(100, 104):
            model(**_images(seed))
    model.eval()


def _text_model(model):
    return model, _tokens, "last_hidden_state"


_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _build(name: str):
    """(model, batch(seed) -> a dict of inputs, the output compared, attention layers)."""
    torch.manual_seed(0)
    if name == "resnet":
        config = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
        return (*_image_model(T.ResNetForImageClassification(config)), 0)
    if name == "mobilenetv2":
        config = T.MobileNetV2Config(depth_multiplier=0.35, layer_norm_eps=1e-8)  # see _settle_batchnorms
        return (*_image_model(T.MobileNetV2Model(config), "pooler_output"), 0)
    if name == "efficientnet":
        config = T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.3, hidden_dim=320, batch_norm_eps=1e-8
        )
        return (*_image_model(T.EfficientNetModel(config), "pooler_output"), 0)
    if name == "convnext":
        config = T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)
        return (*_image_model(T.ConvNextForImageClassification(config)), 0)
    if name == "vit":
        config = T.ViTConfig(image_size=32, patch_size=8, **_ENCODER)
        return (*_image_model(T.ViTModel(config, add_pooling_layer=False), "last_hidden_state"), 2)
    if name == "swin":
        config = T.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
        return (*_image_model(T.SwinModel(config), "last_hidden_state"), 2)
    if name == "clip_vision":
        config = T.CLIPVisionConfig(image_size=32, patch_size=8, **_ENCODER)
        return (*_image_model(T.CLIPVisionModel(config), "last_hidden_state"), 2)
    if name == "distilbert":
        return (*_text_model(T.DistilBertModel(T.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=2))), 2)
    if name == "roberta":
        config = T.RobertaConfig(vocab_size=120, max_position_embeddings=80, **_ENCODER)
        return (*_text_model(T.RobertaModel(config, add_pooling_layer=False)), 2)
    if name in ("gpt2", "gpt2_no_cache"):  # GPT-2's default is use_cache=True
        cache = {"use_cache": False} if name == "gpt2_no_cache" else {}
        config = T.GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=2, **cache)
        return (*_text_model(T.GPT2Model(config)), 2)
    if name == "t5_encoder":
        config = T.T5Config(vocab_size=120, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
        return (*_text_model(T.T5EncoderModel(config)), 2)
    if name == "llama":
        config = T.LlamaConfig(vocab_size=120, max_position_embeddings=64, num_key_value_heads=2, **_ENCODER)
        return (*_text_model(T.LlamaModel(config)), 2)
    if name == "whisper_encoder":
        config = T.WhisperConfig(
            num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
            vocab_size=120, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )  # fmt: skip
        encoder = T.WhisperModel(config).get_encoder()
        return encoder, _audio("input_features", (8, 32)), "last_hidden_state", 2
    if name == "wav2vec2":
        config = T.Wav2Vec2Config(
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, **_ENCODER,
        )  # fmt: skip
        return T.Wav2Vec2Model(config), _audio("input_values", (400,)), "last_hidden_state", 2
    raise KeyError(name)


def _audio(name, shape):
    return lambda seed: {name: torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))}


FAST = ["convnext", "vit", "clip_vision", "whisper_encoder", "t5_encoder", "llama", "gpt2", "gpt2_no_cache"]
SLOW = ["resnet", "mobilenetv2", "efficientnet", "swin", "distilbert", "roberta", "wav2vec2"]
ARCHITECTURES = FAST + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_quantizes_exports_directly_and_runs_in_int8(name, tmp_path):
    model, batch, output, attention_layers = _build(name)
    model.eval()
    qm = quantize(model, [batch(i) for i in range(2)], progress=False)  # the dicts, as the README shows
    assert qm.macs.int8_share >= 0.9, qm.summary()
    kinds = Counter(rule.kind for rule in qm.placement.quantized_ops.values())
    assert kinds[OpKind.MATMUL] >= 2 * attention_layers  # Q K^T and P V of every attention layer
    assert qm.input_names == list(batch(0))
    report = qm.export_onnx(tmp_path / f"{name}.onnx")
    assert report.exporter == DIRECT, report.fallback_reason
    assert report.parity.max_steps < 8
    graph = onnx.load(tmp_path / f"{name}.onnx").graph
    assert [i.name for i in graph.input] == list(batch(0))  # pixel_values, input_ids, ...: not input_0
    assert output in [o.name for o in graph.output]  # logits, last_hidden_state: not output_0
    with torch.no_grad():  # on a calibration batch: random deep nets are chaotic outside the ranges they saw
        want, got = model(**batch(0)), qm(**batch(0))
    assert type(got) is type(want)  # the model's own ModelOutput
    want, got = want[output], got[output]
    cosine = nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).mean()
    assert cosine > 0.8, f"int8 vs fp32 cosine {cosine:.3f}"  # a sanity bound: these are random networks


def test_gpt2_with_its_default_kv_cache_is_captured_without_it_and_says_so():
    model, batch, _, _ = _build("gpt2")
    assert model.config.use_cache
    qm = quantize(model.eval(), [batch(i) for i in range(2)], progress=False)
    assert CACHE_NOTE in qm.notes and f"note: {CACHE_NOTE}" in qm.summary()
    assert "past_key_values" not in qm(**batch(0))
    qm(**batch(0), use_cache=False)  # the value it was captured with
    with pytest.raises(ValueError, match="use_cache.*fixed at capture"):
        qm(**batch(0), use_cache=True)
    with pytest.raises(ValueError, match="use_cache=True.*KV cache"):
        quantize(model, [{**batch(0), "use_cache": True}], progress=False)


@pytest.mark.slow
def test_efficientnet_same_padded_convs_are_all_int8_and_batchnorms_folded():
    model, batch, _, _ = _build("efficientnet")
    qm = quantize(model.eval(), [batch(i) for i in range(2)], progress=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert Counter(r.kind for r in qm.placement.quantized_ops.values())[OpKind.CONV] == convs
    assert qm.folded_batchnorms == batchnorms
    assert not [why for why in qm.placement.float_ops.values() if "conv" in why or "batch_norm" in why]


def test_gpt2_conv1d_layers_are_all_int8_linears():
    model, batch, _, _ = _build("gpt2")
    qm = quantize(model.eval(), [batch(i) for i in range(2)], progress=False)
    conv1d = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    assert Counter(r.kind for r in qm.placement.quantized_ops.values())[OpKind.LINEAR] == conv1d == 8
    assert not [why for why in qm.placement.float_ops.values() if "addmm" in why]
