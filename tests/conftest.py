"""Shared fixtures: a tiny random OPT and Llama (fast), the real smollm2-135m (slow), and text
that exists with or without ../shared/data."""

from __future__ import annotations

import os

# The hub is never needed by the tests; offline mode makes a hub lookup fail at once instead
# of retrying the network (the error message is what the tests check).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegpt_utils.data import default_data_dir, load_text  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def have_shared_data() -> bool:
    d = default_data_dir()
    return d is not None and (d / "wikitext-2-raw" / "wiki.test.raw").is_file()


@pytest.fixture(scope="session")
def eval_source() -> str:
    """WikiText-2 test where the offline data is at hand, else the stdlib text."""
    return "wikitext2" if have_shared_data() else "stdlib"


@pytest.fixture(scope="session")
def calib_source() -> str:
    d = default_data_dir()
    ok = d is not None and (d / "wikitext-2" / "valid.txt").is_file()
    return "wikitext2-valid" if ok else "stdlib"


@pytest.fixture(scope="session")
def stdlib_text_cached() -> str:
    return load_text("stdlib")


def tiny_opt(seed: int = 0, layers: int = 2):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers, ffn_dim=128,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def opt_model():
    return tiny_opt()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real smollm2-135m, loaded once per session; tests that
    change it must restore it (use ``smollm2_copy``)."""
    from sparsegpt_utils.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2_copy(smollm2):
    import copy

    model, tok = smollm2
    return copy.deepcopy(model), tok


def tiny_tokenizer(text: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on ``text``: fully offline, a few hundred ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, min(len(text), 200_000), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, stdlib_text_cached):
    """A saved tiny Llama with its own tokenizer: a local model folder that loads offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(stdlib_text_cached)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
