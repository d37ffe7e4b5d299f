"""The models ``distil-eval`` loads: tokenizers (decoders without a pad token pad with EOS), sequence
classifiers, language models (masked or causal, by the directory's config.json), parameter counts."""
import torch

from distil.student import causal_lm_directory


def count_parameters(model):
    """(all parameters, parameters outside ``nn.Embedding`` tables), each shared tensor counted once."""
    seen, total, embedding = set(), 0, 0
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        embedding += p.numel() if id(p) in embedding_ids else 0
    return total, total - embedding


def load_tokenizer(path):
    """The tokenizer of the model directory ``path``. One without a pad token (GPT-2, LLaMA) pads with
    its EOS token, as Hugging Face's sequence-classification examples do for decoders
    (``tokenizer.pad_token = tokenizer.eos_token``): the attention mask hides the filler."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path, labels, tokenizer, loading_info=False):
    """The sequence classifier of ``path`` (``AutoModelForSequenceClassification``) for ``labels``, its
    ``pad_token_id`` the tokenizer's (a decoder's classifier reads the last non-pad token, so it must
    know the pad: :func:`load_tokenizer`); with ``loading_info``: and what transformers' load report
    says, ``{"missing_keys": ..., ...}``."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=False,
        output_loading_info=loading_info,
    )


def load_lm(path):
    """(the language model of ``path``, whether it is causal): ``AutoModelForCausalLM`` when its
    config.json names a causal-LM architecture, else ``AutoModelForMaskedLM``; None when the directory
    lacks the LM head (an encoder-only checkpoint: a fresh random head would score noise)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    causal = causal_lm_directory("models", path)
    auto_class = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model, info = auto_class.from_pretrained(path, output_loading_info=True, trust_remote_code=False)
    return None if info["missing_keys"] else (model, causal)


def head_note(name, info):
    """One line per model instead of transformers' load report: which weights the classifier added
    (the freshly initialised head) and how many of the checkpoint's it left out (e.g. its LM head)."""
    added = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    unused = len(info["unexpected_keys"])
    return (f"distil-eval: {name}: classification head added ({', '.join(added) or 'none'}); "
            f"{unused} checkpoint weights unused")
