"""pipeline.py — what train.py takes from the paper's training pipelines beyond its own loop: Jelassi et al.'s
packed rows (their transformers_ssm_copy, which the paper names for copying) with BOS, and pretrained Mambas
from the model hub on the tasks' tokens (§6, Figs. 10 and 11).
"""
import copy
import string

import torch
import torch.nn as nn

from mimetic import COPY_TASKS, TASK_VOCAB, make_batch, task_vocab_size


def check(cfg):
    """ValueError where --pack or --pretrained cannot take this config."""
    if cfg.pack and cfg.task not in COPY_TASKS:
        raise ValueError(f"--pack is Jelassi et al.'s copying pipeline: for {', '.join(COPY_TASKS)}, not {cfg.task}")
    if cfg.pack and cfg.pack < 2 * cfg.train_len + 3:
        raise ValueError(f"--pack {cfg.pack} cannot hold one example of length {cfg.train_len} "
                         f"({2 * cfg.train_len + 3} tokens with BOS, SEP and STOP)")
    if cfg.reset_state and not cfg.pack:
        raise ValueError("--reset-state resets the state at each packed example's BOS: it needs --pack")
    if cfg.reset_state and cfg.pretrained:
        raise ValueError("--reset-state needs our LM's new_example; --pretrained models take none")
    if cfg.reset_state and set(cfg.pattern or "M") != {"M"}:
        raise ValueError(f"--reset-state resets Mamba layers; --pattern {cfg.pattern} has "
                         "attention layers, which take no reset")
    if cfg.teacher_layer is not None and not cfg.pretrained:
        raise ValueError("--teacher-layer picks a layer of the --pretrained model; name one")
    if cfg.pretrained and cfg.vocab_size > len(CONTENT_CHARACTERS):
        raise ValueError(f"--pretrained maps content tokens to the characters a-z, A-Z, 0-9: --vocab-size "
                         f"{cfg.vocab_size} > {len(CONTENT_CHARACTERS)}")


def packed_batch(cfg, g):
    """Jelassi et al.'s training rows (data_utils.py): examples BOS x SEP y STOP, lengths drawn per example
    from [min_train_len, train_len], joined until the row has cfg.pack tokens; the example the row's end
    cuts is not labeled. (inputs, targets) of shape (batch_size, pack − 1)."""
    bos = task_vocab_size(cfg.task, cfg.vocab_size)
    rows = []
    for _ in range(cfg.batch_size):
        seq, labeled = [], []
        while len(seq) < cfg.pack:
            n = int(torch.randint(cfg.min_train_len, cfg.train_len + 1, (), generator=g))
            inputs, targets = make_batch(cfg.task, 1, n, vocab_size=cfg.vocab_size, generator=g)
            start = len(seq)
            seq += [bos, *inputs[0].tolist(), targets[0, -1].item()]  # targets end with STOP
            labeled += [False, False, *(targets[0] != -100).tolist()]  # token t+1 is labeled where targets[t] is
        labeled[start:] = [False] * (len(seq) - start) if len(seq) > cfg.pack else labeled[start:]
        row, mask = torch.tensor(seq[:cfg.pack]), torch.tensor(labeled[:cfg.pack])
        rows.append((row[:-1], torch.where(mask[1:], row[1:], -100)))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def example_starts(cfg, inputs):
    """(b, L) bool, True at each BOS of packed rows: where every example starts (--reset-state)."""
    return inputs == task_vocab_size(cfg.task, cfg.vocab_size)


class WithBOS(nn.Module):
    """A model trained on --pack rows reads BOS before each example: prepend it, drop its prediction."""

    def __init__(self, model, bos):
        super().__init__()
        self.model, self.bos = model, bos

    def forward(self, input_ids):
        bos = torch.full_like(input_ids[:, :1], self.bos)
        return self.model(torch.cat([bos, input_ids], dim=1))[:, 1:]


SPECIAL_CHARACTERS = {"SEP": "|", "STOP": ".", "BOS": "$", "BLANK": "_", "TRIGGER": "#"}  # the pipeline's |, ., $
CONTENT_CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits  # a-z first, as the pipeline


class Pretrained(nn.Module):
    """A transformers Mamba LM from --pretrained (a hub id or a saved folder) on a task's tokens (§6, Fig. 10):
    content token i is the model's token for the i-th of a-z, A-Z, 0-9 and SEP, STOP, BOS are '|', '.', '$',
    Jelassi et al.'s characters (without a tokenizer: the model's ids 0, 1, ...); the logits are those of the
    task's tokens. With --teacher-layer i, the model is a student of --n-layers copies of the teacher's layer
    i (mixer and norm), with the teacher's embedding and final norm (§6, Fig. 11)."""

    def __init__(self, cfg):
        super().__init__()
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(cfg.pretrained)
        if cfg.teacher_layer is not None:
            teacher = self.model.backbone.layers
            if not 0 <= cfg.teacher_layer < len(teacher):
                raise ValueError(f"--teacher-layer {cfg.teacher_layer}: the teacher has {len(teacher)} layers")
            self.model.backbone.layers = nn.ModuleList(copy.deepcopy(teacher[cfg.teacher_layer])
                                                       for _ in range(cfg.n_layers))
            for i, block in enumerate(self.model.backbone.layers):
                block.layer_idx = block.mixer.layer_idx = i
            self.model.config.num_hidden_layers = cfg.n_layers
        names = [*CONTENT_CHARACTERS[:cfg.vocab_size], *(SPECIAL_CHARACTERS[n] for n in task_specials(cfg))]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.pretrained)
            ids = [tokenizer.convert_tokens_to_ids(name) for name in names]
        except (OSError, ValueError):  # no tokenizer saved with the model
            ids = list(range(len(names)))
        self.register_buffer("ids", torch.tensor(ids))

    @property
    def layers(self):  # blocks with .norm and .mixer, as LM's
        return self.model.backbone.layers

    def forward(self, input_ids):
        return self.model(self.ids[input_ids]).logits[..., self.ids]


def task_specials(cfg):
    """The names of the task's special tokens, in id order (and BOS last, with --pack)."""
    return [*TASK_VOCAB[cfg.task][1], *(["BOS"] if cfg.pack else [])]
