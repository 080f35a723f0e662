"""Shared fixtures: the golden data, tiny random models and their calibration batches."""
import json
import os
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter; it must be on before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
GOLDEN_EXTRAS = GOLDEN.with_name("golden-extras")


def golden_dir() -> Path:
    """``LORA_DA_GOLDEN`` or the copy in ``tests/data/golden``."""
    env = os.environ.get("LORA_DA_GOLDEN")
    path = Path(env) if env else GOLDEN
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"golden data not found at {path} (LORA_DA_GOLDEN={env!r})")
    return path


WORDS = ("the film was good bad long short funny dull great awful plot actor music scene ending story "
         "review says it is a not very quite really").split()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The golden model's files beside a word-level tokenizer (``WORDS``) of its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("model")
    for item in (golden_dir() / "model").iterdir():
        (folder / item.name).symlink_to(item)
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(folder))
    return folder


def write_examples(path: Path, count: int, seed: int, min_words: int, max_words: int, **fields) -> Path:
    """A JSONL file of ``count`` examples of random ``WORDS``: the first two as "prompt", the rest as
    "text", and ``fields`` in every line."""
    gen = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for _ in range(count):
            length = int(torch.randint(min_words, max_words, (1,), generator=gen))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=gen)]
            f.write(json.dumps({"prompt": " ".join(words[:2]), "text": " ".join(words[2:]), **fields}) + "\n")
    return path


def bad_input(argv, capsys) -> str:
    """The ``lora-da`` command's stderr for ``argv``, checked to be one error line and exit status 2."""
    from lora_da import cli

    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err
    assert err.startswith("lora-da: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def golden_errors(model_dir: Path, batches: list, hyperparameters: dict, expected: Path, dtype: torch.dtype,
                  device: str = "cpu", **overrides) -> Dict[str, Dict[str, float]]:
    """Relative Frobenius errors against the authors' factors in ``expected`` (a safetensors
    file), per quantity ("BA", "lora_A", "lora_B") and module: the model in ``model_dir`` as
    ``dtype`` on ``device``, statistics from ``batches``, the config from ``hyperparameters`` and
    ``overrides``; the factors' dtype is checked on the way."""
    import lora_da
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device, dtype)
    cfg = lora_da.LoraDAConfig(target_modules=TARGETS, **{**hyperparameters, **overrides})
    factors = lora_da.solve(lora_da.collect_statistics(model, batches, cfg, progress=False), cfg, progress=False)
    want = load_file(str(expected))
    assert {f"{name}.BA" for name in factors} == {k for k in want if k.endswith(".BA")}
    errors: Dict[str, Dict[str, float]] = {"BA": {}, "lora_A": {}, "lora_B": {}}
    for name, f in factors.items():
        assert f.lora_A.dtype == f.lora_B.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        got = {"BA": f.lora_B.double() @ f.lora_A.double(), "lora_A": f.lora_A, "lora_B": f.lora_B}
        for key, value in got.items():
            target = want[f"{name}.{key}"].double()
            errors[key][name] = float(torch.linalg.norm(value.double().cpu() - target) / torch.linalg.norm(target))
    return errors


def golden_batches(path: Path, count: Optional[int] = None) -> list:
    """The first ``count`` (default all) golden calibration sequences, one batch each."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "calibration.safetensors"))
    ids = sorted({key.split(".")[0] for key in tensors})[:count]
    return [{k: tensors[f"{i}.{k}"][None] for k in ("input_ids", "attention_mask", "labels")} for i in ids]


@pytest.fixture(scope="session")
def golden_extras(golden):
    """(folder, manifest) of the authors' factors for their further options, from
    ``LORA_DA_GOLDEN_EXTRAS`` or ``tests/data/golden-extras``: the golden model and calibration
    sequences, other hyperparameters."""
    env = os.environ.get("LORA_DA_GOLDEN_EXTRAS")
    path = Path(env) if env else GOLDEN_EXTRAS
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"golden extras not found at {path} (LORA_DA_GOLDEN_EXTRAS={env!r})")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["num_sequences"] == golden[1]["num_sequences"]
    return path, manifest


@pytest.fixture(scope="session")
def golden():
    """(folder, manifest, calibration batches at batch size 1)."""
    path = golden_dir()
    manifest = json.loads((path / "manifest.json").read_text())
    batches = golden_batches(path)
    assert len(batches) == manifest["num_sequences"]
    return path, manifest, batches


def tiny_llama(seed: int = 0, dtype=torch.float64):
    """A random 2-layer Llama (hidden 24, GQA, gated MLP 40, vocab 50)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float64):
    """A random 2-layer GPT-2 (Conv1D layers), hidden 16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_bert_classifier(seed: int = 0, dtype=torch.float64, num_labels: int = 2):
    """A random 2-layer BERT sequence classifier (hidden 16, MLP 24, vocab 50), dropout off: its
    pooler and head read one vector per sequence."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype).eval()


def classification_batches(sizes, seed: int = 0, num_labels: int = 2):
    """random_batches with one class label per sequence: labels [B]."""
    batches = random_batches(sizes, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for batch in batches:
        batch["labels"] = torch.randint(0, num_labels, (batch["input_ids"].shape[0],), generator=generator)
    return batches


def random_batches(sizes, seed: int = 0, vocab: int = 50, padding: str = "right", max_len: int = 11):
    """Batches of random sequences with lengths 3..max_len, padded left or right, labels -100 on
    padding and on a random-length prompt."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        lengths = torch.randint(3, max_len + 1, (size,), generator=generator).tolist()
        width = max(lengths)
        ids = torch.zeros((size, width), dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        for row, length in enumerate(lengths):
            cols = slice(0, length) if padding == "right" else slice(width - length, width)
            tokens = torch.randint(1, vocab, (length,), generator=generator)
            ids[row, cols] = tokens
            mask[row, cols] = 1
            prompt = int(torch.randint(0, length - 1, (1,), generator=generator))
            row_labels = tokens.clone()
            row_labels[:prompt] = -100
            labels[row, cols] = row_labels
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def model_state(model):
    """Everything collection must leave as it was: parameter values and flags, modes, hooks."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
    }


def assert_same_state(before, after):
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["params"].keys() == after["params"].keys()
    for name, (value, flag, grad) in before["params"].items():
        new_value, new_flag, new_grad = after["params"][name]
        assert flag == new_flag, name
        assert torch.equal(value, new_value), name
        assert grad is None and new_grad is None, name


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Fresh float tensors (torch.empty, empty_like, Tensor.new_empty) start as NaN, so that an
    element a kernel or its wrapper fails to write shows up in the result."""
    def poisoned(make):
        def call(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return call

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
