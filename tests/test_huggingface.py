"""Hugging Face transformers models as users bring them, built from small configs
(nothing is downloaded): a padded BERT classifier, a tied GPT-2 language model, a
raw model returning a ``ModelOutput``, dropout ensembles, hand-written criteria."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNet, NeuralNetClassifier
from skorch.helper import SliceDict

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._data import take
from sktda._ensembles import member_from_module
from sktda._featurize import featurize
from sktda._gradients import GradientConfig, VmapEngine, make_engine
from sktda._task import NetTask

from .conftest import bert_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CLASSIFY = NetTask(is_classifier=True)
GENERATE = NetTask(is_classifier=True, target="sequence_log_likelihood", is_sequence=True)


def gpt2_config(**kwargs):
    params = dict(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2Config(**{**params, **kwargs})


class BertClassifier(torch.nn.Module):
    """The usual thin wrapper: keyword inputs, logits out."""

    def __init__(self, **config):
        super().__init__()
        self.bert = transformers.BertForSequenceClassification(bert_config(**config))

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


class GPT2(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.gpt = transformers.GPT2LMHeadModel(gpt2_config(**config))

    def forward(self, input_ids):
        return self.gpt(input_ids=input_ids).logits


class TokenCE(torch.nn.Module):
    """A token cross-entropy written by hand (no reduction attribute, not a
    subclass of nn.CrossEntropyLoss)."""

    def forward(self, logits, target):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def padded_tokens(n=40, T=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, (n, T))
    lengths = rng.integers(T // 2, T + 1, n)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    y = (ids[:, 0] % 3).astype(np.int64)
    return ids * mask, mask, y


def _frozen(module):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return member_from_module(module, None, 0)


def _row_by_row(engine, X, y):
    """The reference: each sample's gradient by plain autograd, same projection."""
    grads = engine._row_gradients(X, y, sorted(engine.member.params))
    return engine.projector(grads).numpy()


@pytest.mark.parametrize("proj_dim", [64, None])
def test_padded_bert_takes_every_layer_on_a_route(proj_dim):
    torch.manual_seed(0)
    ids, mask, y = padded_tokens(10)
    X = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    y = torch.from_numpy(y)
    member = _frozen(BertClassifier())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = make_engine(
            member, GradientConfig(task=CLASSIFY, proj_dim=proj_dim), (take(X, slice(0, 3)), y[:3])
        )
    # word, position (one call per batch) and token-type embeddings, attention, norms
    assert not engine.traced and not engine.rowwise
    fast = featurize(engine, X, y, batch_size=4).phi
    np.testing.assert_allclose(fast, _row_by_row(engine, X, y), rtol=1e-4, atol=1e-5 * np.abs(fast).max())


@pytest.mark.parametrize("padded", [False, True])
def test_tied_gpt2_takes_every_layer_on_a_route(padded):
    torch.manual_seed(0)
    ids, mask, _ = padded_tokens(9, T=13)
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
    if padded:  # padding as next tokens is left out of the loss
        y = torch.where(torch.from_numpy(mask[:, 1:]) == 1, y, -100)
    member = _frozen(GPT2())
    assert member.module.gpt.lm_head.weight is member.module.gpt.transformer.wte.weight
    engine = make_engine(member, GradientConfig(task=GENERATE, proj_dim=48), (x[:3], y[:3]))
    assert not engine.traced and not engine.rowwise
    assert "gpt.transformer.h.0.attn.c_attn" in {r.name for r in engine.routes}  # Conv1D
    fast = featurize(engine, x, y, batch_size=4).phi
    np.testing.assert_allclose(fast, _row_by_row(engine, x, y), rtol=1e-4, atol=1e-5 * np.abs(fast).max())
    if not padded:  # and equal to the whole model under vmap, where vmap can run it
        slow = featurize(VmapEngine(member, GENERATE, torch.device("cpu"), engine.projector), x, y, 4).phi
        np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5 * np.abs(fast).max())


class Llama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, X):
        return self.model(input_ids=X).logits


def test_llama_rms_norms_take_a_route():
    """transformers' own RMSNorm (not nn.RMSNorm) has a route, checked against
    autograd: no parameter is left to the slower traced path."""
    torch.manual_seed(0)
    ids, _, _ = padded_tokens(9, T=13)
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
    member = _frozen(Llama())
    engine = make_engine(member, GradientConfig(task=GENERATE, proj_dim=48), (x[:3], y[:3]))
    assert not engine.traced and not engine.rowwise
    assert "model.model.layers.0.input_layernorm" in {r.name for r in engine.routes}
    fast = featurize(engine, x, y, batch_size=4).phi
    np.testing.assert_allclose(fast, _row_by_row(engine, x, y), rtol=1e-4, atol=1e-5 * np.abs(fast).max())


class Classifier(torch.nn.Module):
    """A transformers ``...ForSequenceClassification``-like model from a config,
    its input passed under ``input_name``."""

    def __init__(self, model_class, config, input_name):
        super().__init__()
        self.model, self.input_name = model_class(config), input_name

    def forward(self, X):
        return self.model(**{self.input_name: X}).logits


def _exact_without_row_by_row(module, x, y, proj_dim=40):
    """The route-checked engine of ``module`` (with no "one sample at a time"
    warning), after its features are checked against autograd's."""
    member = _frozen(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = make_engine(member, GradientConfig(task=CLASSIFY, proj_dim=proj_dim), (x[:3], y[:3]))
    assert not engine.rowwise
    fast = featurize(engine, x, y, batch_size=4).phi
    np.testing.assert_allclose(fast, _row_by_row(engine, x, y), rtol=1e-4, atol=1e-5 * np.abs(fast).max())
    return engine


def test_vit_class_token_broadcast_to_the_batch_is_not_taken_row_by_row():
    """ViT expands its class token to the batch and concatenates it with the patch
    embeddings: a use of the parameter, each sample's gradient the sum over its
    positions, exact against autograd and never differentiated row by row."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    module = Classifier(transformers.ViTForImageClassification, config, "pixel_values")
    engine = _exact_without_row_by_row(module, torch.randn(7, 3, 8, 8), torch.randint(0, 3, (7,)))
    assert "model.vit.embeddings.cls_token" in engine.traced


def test_bart_positional_embeddings_step_aside_from_the_embedding_route():
    """BART's learned positional embedding subclasses nn.Embedding with a forward of
    its own (it embeds positions computed from its input's shape): its route is
    checked, fails, and is demoted; its positions, a constant expanded to the batch,
    make it a traced use. Nothing crashes, nothing goes row by row, and the features
    are autograd's."""
    from sktda._layers import own_forward

    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        num_labels=3,
    )  # fmt: skip
    module = Classifier(transformers.BartForSequenceClassification, config, "input_ids")
    assert own_forward(module.model.model.encoder.embed_positions)
    assert not own_forward(torch.nn.Embedding(3, 2))
    x, y = torch.randint(3, 40, (7, 10)), torch.randint(0, 3, (7,))
    x[:, -1] = 2  # the end-of-sequence token the classification head reads
    engine = _exact_without_row_by_row(module, x, y)
    assert "model.model.encoder.embed_positions.weight" in engine.traced
    assert "model.model.encoder.layers.0.fc1" in {r.name for r in engine.routes}


def test_conv1d_is_recognised_without_importing_transformers():
    """sktda names transformers' Conv1D by its path, so importing sktda does not
    import transformers, and a Conv1D made afterwards still gets its route."""
    # sktda's own dependencies first: where one of them imports transformers, sktda cannot be told apart
    code = (
        "import sys, numpy, sklearn, skorch, torch; before = 'transformers' in sys.modules; "
        "import sktda, sktda.routes; after = 'transformers' in sys.modules; "
        "from sktda._layers import Conv1DRoute, route_class; "
        "from transformers.pytorch_utils import Conv1D; "
        "print(before, after, route_class(Conv1D(4, 3)) is Conv1DRoute)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, recognised = out.stdout.split()
    assert recognised == "True"
    if before == "True":
        pytest.skip("a dependency of sktda imports transformers in this environment")
    assert after == "False"


def _bert_net(module=BertClassifier, **kwargs):
    params = dict(
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=2,
        batch_size=16,
        train_split=None,
        verbose=0,
    )
    return NeuralNetClassifier(module, **{**params, **kwargs})


def _gpt2_net():
    """A GPT-2 language model with a token cross-entropy written by hand."""
    return NeuralNet(
        GPT2,
        criterion=TokenCE,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=1,
        train_split=None,
        verbose=0,
    )


@pytest.fixture(scope="module")
def padded_data():
    ids, mask, y = padded_tokens(40)
    return SliceDict(input_ids=ids, attention_mask=mask), y


def test_padded_bert_classifier_attribution_and_detection(padded_data):
    X, y = padded_data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attr = EnsembleAttributor(_bert_net(), proj_dim=64, random_state=0).fit(X, y)
        det = OutlierGradientDetector(_bert_net(), n_checkpoints=2, random_state=0).fit(X, y)
    A = attr.attribute(X[:5], y[:5])
    assert A.shape == (5, 40) and np.isfinite(A).all() and np.abs(A).max() > 0
    assert det.predict(X[:5]).shape == (5,) and np.isfinite(det.train_scores_).all()


def test_a_raw_model_returning_a_model_output_is_trained_on_its_logits(padded_data):
    X, y = padded_data
    raw = _bert_net(transformers.BertForSequenceClassification, module__config=bert_config())
    wrapped = EnsembleAttributor(_bert_net(), proj_dim=64, random_state=0).fit(X, y)
    direct = EnsembleAttributor(raw, proj_dim=64, random_state=0).fit(X, y)
    assert isinstance(direct.estimators_[0].predict_proba(X[:3]), np.ndarray)
    # the same model: the wrapper only renames its parameters ("bert." prefix)
    np.testing.assert_allclose(direct.self_attribute(), wrapped.self_attribute(), rtol=1e-4)


def test_a_module_without_logits_is_refused_before_training_with_the_wrapper(padded_data):
    X, y = padded_data
    backbone = _bert_net(transformers.BertModel, module__config=bert_config())
    with pytest.raises(TypeError, match=r"(?s)BaseModelOutput.*no 'logits'.*def forward\(self, \*\*inputs\)"):
        EnsembleAttributor(backbone, proj_dim=64).fit(X, y)


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_dropout_ensembles_mask_the_dropout_modules_that_are_called(model, padded_data):
    X, y = padded_data
    if model == "bert":
        net, inputs, targets, kwargs = _bert_net(), X, y, {}
    else:
        ids = X["input_ids"]
        net, inputs, targets = _gpt2_net(), ids[:, :-1], ids[:, 1:]
        kwargs = {"target": "sequence_log_likelihood"}
    attr = EnsembleAttributor(net, ensemble="dropout", n_masks=2, proj_dim=32, random_state=0, **kwargs)
    # the attention's dropout is passed to scaled_dot_product_attention as a rate only
    with pytest.warns(UserWarning, match=r"dropout module\(s\) .* are never called"):
        attr.fit(inputs, targets)
    A = attr.attribute(inputs[:4], targets[:4])
    assert A.shape == (4, 40) and np.isfinite(A).all()
    assert attr.n_members_ == 2


def test_dropout_ensemble_without_called_dropout_is_refused_before_training(padded_data):
    class FunctionalDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 3)
            self.dropout = torch.nn.Dropout(0.1)  # kept for its rate only

        def forward(self, input_ids, attention_mask):
            h = input_ids.float() * attention_mask
            return self.fc(torch.nn.functional.dropout(h, self.dropout.p, self.training))

    X, y = padded_data
    attr = EnsembleAttributor(_bert_net(FunctionalDropout, max_epochs=1), ensemble="dropout")
    with pytest.raises(ValueError, match="calls none of its 1"):
        attr.fit(X, y)
    assert not hasattr(attr, "estimators_")


def test_language_model_with_a_hand_written_criterion():
    ids, _, _ = padded_tokens(30, T=10)
    attr = EnsembleAttributor(_gpt2_net(), target="sequence_log_likelihood", proj_dim=32, random_state=0)
    attr.fit(ids[:, :-1], ids[:, 1:])
    A = attr.attribute(ids[:3, :-1], ids[:3, 1:])
    assert A.shape == (3, 30) and np.isfinite(A).all() and np.abs(A).max() > 0
    # the training side is the criterion's own per-sample loss: the mean over each
    # passage's tokens, as TokenCE computes it for one passage
    member = attr.ensemble_.members()[0]
    out = member.forward(member.params, torch.from_numpy(ids[:2, :-1]))
    y = torch.from_numpy(ids[:2, 1:])
    f, residual = attr._task.target_and_residual(out, y)
    expected = torch.stack([TokenCE()(out[i : i + 1], y[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(f, -expected)
    torch.testing.assert_close(residual, torch.ones(2))


def test_a_criterion_that_couples_the_samples_is_refused_before_training(padded_data):
    class Centred(torch.nn.Module):
        def forward(self, logits, target):
            return torch.nn.functional.cross_entropy(logits - logits.mean(0), target)

    X, y = padded_data
    with pytest.raises(ValueError, match="couples the samples of a batch"):
        EnsembleAttributor(_bert_net(criterion=Centred)).fit(X, y)
