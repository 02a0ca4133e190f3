"""What mutation testing of the cross-tokenizer distiller (`lfm.distill.xtok`) found untested:
how `encode_texts` pads each tensor (each tokenizer's own pad id, 0 when it has none, masks of
1/0, pairs with -1, one column when nothing is there), which model its errors name, what the
teacher in memory is given and on which device, what a SCORES teacher gives back and where,
and when held-out blocks are led by BOS; and what `uld` itself does: its refusals word for word,
what a SCORES teacher is asked (in the training seed's order), that a teacher in memory is held
in eval mode, the counts it reports, and the run and evaluation it passes on to the loop. Every
expected value is worked out by hand on toy tokenizers and tensors written out here, not by the
code under test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_distill_mutants import CharTokenizer, PromptTeacher
from torch import nn

from lfm.access import Access, LocalModel
from lfm.core.train import TrainConfig
from lfm.distill.xtok import ULDConfig, encode_texts, held_out_blocks, teacher_rows, uld
from lfm.errors import ConfigError
from lfm.runs import Run

a, b, c, d, e = (ord(x) for x in "abcde")


class PadTokenizer(CharTokenizer):
    """`CharTokenizer` with a given pad id (None: the tokenizer has none)."""

    def __init__(self, pad, bos: bool = True):
        super().__init__(bos=bos)
        self.pad_token_id = pad


def _white(tokenizer):
    """A teacher in memory (WEIGHTS) holding `tokenizer`; `encode_texts` never runs its model."""
    return SimpleNamespace(access=Access.WEIGHTS, model=None, tokenizer=tokenizer)


class CharTeacher:
    """A SCORES handle that encodes one id per character and decodes them back."""

    access = Access.SCORES
    vocab_size = 2

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_encode_texts_pads_with_each_tokenizers_pad_id_masks_with_ones_and_pairs_with_minus_one():
    # teacher: BOS a b c / BOS d e, padded with its pad id 5; student: a b c / d e, pad id 7.
    # boundaries 1, 2, 3 close the teacher's tokens 1, 2, 3 and the student's 0, 1, 2
    teacher, student = _white(PadTokenizer(5)), SimpleNamespace(tokenizer=PadTokenizer(7, False))
    s_ids, s_mask, t_ids, t_mask, pairs, index = encode_texts(teacher, student, ["abc", "de"])
    assert s_ids.tolist() == [[a, b, c], [d, e, 7]]
    assert s_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert t_ids.tolist() == [[1, a, b, c], [1, d, e, 5]]
    assert t_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert pairs.tolist() == [
        [[1, 1, 0], [2, 2, 1], [3, 3, 2]],
        [[1, 1, 0], [2, 2, 1], [-1, -1, -1]],
    ]
    assert index.tolist() == [0, 1]
    assert all(x.dtype == torch.long for x in (s_ids, s_mask, t_ids, t_mask, pairs))


def test_encode_texts_pads_ids_with_zero_when_a_tokenizer_has_no_pad_id():
    teacher, student = _white(PadTokenizer(None)), SimpleNamespace(tokenizer=PadTokenizer(None))
    s_ids, _, t_ids, _, _, _ = encode_texts(teacher, student, ["abc", "d"])
    assert s_ids.tolist() == [[1, a, b, c], [1, d, 0, 0]]
    assert t_ids.tolist() == [[1, a, b, c], [1, d, 0, 0]]


def test_a_scores_teacher_gets_one_zero_column_of_ids_and_mask_for_a_single_text():
    # a SCORES teacher has no ids: (1, 1) of 0; boundaries 1, 2 close its tokens 0, 1 and the
    # student's 0, 1
    student = SimpleNamespace(tokenizer=CharTokenizer(bos=False))
    s_ids, s_mask, t_ids, t_mask, pairs, index = encode_texts(CharTeacher(), student, ["ab"])
    assert s_ids.tolist() == [[a, b]] and s_mask.tolist() == [[1, 1]]
    assert t_ids.tolist() == [[0]] and t_mask.tolist() == [[0]]
    assert pairs.tolist() == [[[1, 0, 0], [2, 1, 1]]] and index.tolist() == [0]


class BareModule(nn.Module):
    """A model given without its tokenizer."""


class SlowTokenizer:
    """A tokenizer that cannot give character offsets (as a slow Python tokenizer)."""

    pad_token_id = 0

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        raise NotImplementedError


def test_a_student_without_its_tokenizer_is_refused_naming_the_student_and_its_type():
    with pytest.raises(
        ConfigError, match=r"the student needs its tokenizer.*not a bare BareModule"
    ):
        encode_texts(CharTeacher(), BareModule(), ["ab"])


def test_a_teacher_in_memory_without_its_tokenizer_is_refused_naming_the_teacher():
    student = SimpleNamespace(tokenizer=CharTokenizer())
    with pytest.raises(
        ConfigError, match=r"the teacher needs its tokenizer.*not a bare BareModule"
    ):
        encode_texts(BareModule(), student, ["ab"])


def test_a_tokenizer_without_offsets_is_refused_naming_its_type_and_asking_for_a_fast_one():
    student = SimpleNamespace(tokenizer=SlowTokenizer())
    with pytest.raises(ConfigError, match=r"SlowTokenizer gives no character offsets.*fast"):
        encode_texts(CharTeacher(), student, ["ab"])


def _batch(t_ids, t_mask, pairs):
    t_ids, t_mask = torch.tensor(t_ids), torch.tensor(t_mask)
    return None, None, t_ids, t_mask, torch.tensor(pairs), torch.arange(len(t_ids))


class IdsAndMask(nn.Module):
    """A teacher whose logits at each position are (its token id, its mask value)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.stack([input_ids, attention_mask], -1).float())


def test_a_teacher_in_memory_reads_its_ids_and_mask_and_gives_the_rows_of_its_aligned_tokens():
    # aligned: text 0 at teacher tokens 1 and 2, text 1 at its token 0
    batch = _batch(
        [[10, 11, 12], [20, 21, 0]],
        [[1, 1, 1], [1, 1, 0]],
        [[[1, 1, 0], [2, 2, 1]], [[1, 0, 0], [-1, -1, -1]]],
    )
    got = teacher_rows(IdsAndMask(), ["ab", "c"], batch)
    torch.testing.assert_close(got, torch.tensor([[11.0, 1.0], [12.0, 1.0], [20.0, 1.0]]))


class Picked:
    """What indexing `Logits` gives: records where `.to` sends it, then is (P, 2) zeros."""

    def __init__(self, seen, n):
        self.seen, self.n = seen, n

    def to(self, device):
        self.seen["back_to"] = device
        return torch.zeros(self.n, 2)


class Logits:
    """Logits that record the devices of the index tensors they are read with."""

    def __init__(self, seen):
        self.seen = seen

    def __getitem__(self, index):
        self.seen["index"] = [i.device for i in index]
        return Picked(self.seen, len(index[0]))


class OnMeta(nn.Module):
    """A teacher whose parameters live on another device (meta) and which records where its
    inputs come from."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(1, device="meta"))
        self.seen = {}

    def forward(self, input_ids, attention_mask):
        self.seen["inputs"] = [input_ids.device, attention_mask.device]
        return SimpleNamespace(logits=Logits(self.seen))


def test_a_teacher_in_memory_reads_on_its_own_device_and_its_rows_return_to_the_batchs():
    teacher = OnMeta()
    batch = _batch([[10, 11]], [[1, 1]], [[[1, 0, 0], [2, 1, 1]]])
    assert teacher_rows(teacher, ["ab"], batch).shape == (2, 2)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert teacher.seen == {"inputs": [meta, meta], "index": [meta, meta], "back_to": cpu}


def test_a_scores_teacher_with_nothing_aligned_is_not_asked_and_gives_zero_rows_of_its_vocab():
    teacher = PromptTeacher()
    got = teacher_rows(teacher, ["ab"], _batch([[0]], [[0]], [[[-1, -1, -1]]]))
    assert teacher.prompts == []
    torch.testing.assert_close(got, torch.zeros(0, 2))


def test_a_scores_teachers_rows_are_moved_to_the_batchs_device():
    # the batch's ids on meta (as on an accelerator), the handle answering on the CPU
    teacher = PromptTeacher()
    batch = list(_batch([[0]], [[0]], [[[2, 0, 1]]]))
    batch[2] = torch.zeros(1, 1, dtype=torch.long, device="meta")
    got = teacher_rows(teacher, ["abc"], batch)
    assert teacher.prompts == ["ab"]
    assert got.device == torch.device("meta") and got.shape == (1, 2)


def test_held_out_blocks_get_no_bos_lead_from_a_tokenizer_that_only_appends_eos():
    # "" encodes to [EOS = 2], not to BOS = 1: a b c d EOS e f EOS, one block of 3 as it is
    got = held_out_blocks(CharTokenizer(bos=False, eos=True), ["abcd", "ef"], 3, 1)
    assert got.tolist() == [[a, b, c]]


# -- `uld` itself, on toy models: one token per character, the student without BOS ----------


class DecodingCharTokenizer(CharTokenizer):
    """`CharTokenizer` that also decodes (specials 0, 1, 2 as "")."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 2)


class ToyLM(nn.Module):
    """Embedding and linear head over `vocab` ids; records its train/eval mode at each call."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb, self.head, self.modes = nn.Embedding(vocab, 4), nn.Linear(4, vocab), []

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        self.modes.append(self.training)
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


class AskedChars(CharTeacher):
    """A SCORES handle of one id per character, answering (.5, .5) and recording the prompts.
    Its two token strings, "\\x00" and "\\x01", are not the student's: nothing is shared."""

    def __init__(self):
        self.prompts = []

    def next_token_logprobs(self, prompts):
        self.prompts += prompts
        return torch.tensor([[0.5, 0.5]]).log().expand(len(prompts), 2)


def _char_student() -> LocalModel:
    return LocalModel(ToyLM(128), DecodingCharTokenizer(bos=False), "student")


STEPS = TrainConfig(steps=2, lr=1e-2, progress=False)


def test_uld_asks_a_scores_teacher_at_each_aligned_prefix_in_the_training_seeds_order():
    # each text "xy" aligns at b = 1 and b = 2 (a token of each side closes there): the teacher
    # is asked for "x" and "xy"; batches of one text in the order of seed 3: texts 3, 0, 2, 1
    # (the order `shuffled_batches` gives for seed 3; seed 0 would give 0, 1, 3, 2)
    teacher, texts = AskedChars(), ["ab", "cd", "ef", "gh"]
    res = uld(teacher, _char_student(), texts, ULDConfig(batch_size=1),
              train_cfg=STEPS.replace(steps=4, seed=3))  # fmt: skip
    assert teacher.prompts == ["g", "gh", "a", "ab", "e", "ef", "c", "cd"]
    # 2 pairs and 2 student tokens per text; no token string in common
    assert res.info == {"aligned": 8, "tokens": 8, "shared": 0}


def test_uld_holds_a_teacher_in_memory_in_eval_mode_and_gives_it_back_as_it_was():
    # teacher: BOS a b c (boundaries 1, 2, 3 close its tokens 1, 2, 3); student: a b c; the
    # strings of ids 3 … 127 are in both vocabularies (0, 1, 2 are specials: "")
    teacher = LocalModel(ToyLM(130), DecodingCharTokenizer(), "teacher")
    teacher.model.train()
    student = _char_student()
    res = uld(teacher, student, ["abc"], ULDConfig(batch_size=1), train_cfg=STEPS)
    assert teacher.model.modes == [False, False]  # one pass per step, in eval mode
    assert teacher.model.training and all(p.requires_grad for p in teacher.model.parameters())
    assert res.info == {"aligned": 3, "tokens": 3, "shared": 125}
    assert res.student is student.model and not res.student.training


def test_uld_passes_its_run_and_evaluation_on_to_the_training_loop(tmp_path):
    run = Run("uld", root=tmp_path)
    res = uld(AskedChars(), _char_student(), ["ab"], ULDConfig(batch_size=1), train_cfg=STEPS,
              run=run, evaluate=lambda model: {"probe": 0.5})  # fmt: skip
    assert res.history.evals == [{"step": 2, "probe": 0.5}]
    assert run.manifest["metrics"]["step"] == 2 and run.manifest["metrics"]["probe"] == 0.5
    assert run.manifest["metrics"]["loss"] == pytest.approx(res.history.losses[-1])


def test_uld_refusals_name_the_model_without_a_tokenizer_and_ask_for_longer_texts():
    with pytest.raises(ConfigError) as e:
        uld(AskedChars(), BareModule(), ["ab"], ULDConfig(), train_cfg=STEPS)
    assert str(e.value) == (
        "the student needs its tokenizer: give it as a LocalModel (model and tokenizer), "
        "not a bare BareModule"
    )
    with pytest.raises(ConfigError) as e:
        uld(BareModule(), _char_student(), ["ab"], ULDConfig(), train_cfg=STEPS)
    assert str(e.value).startswith("the teacher needs its tokenizer: give it as a LocalModel")
    with pytest.raises(ConfigError) as e:
        uld(AskedChars(), _char_student(), ["", ""], ULDConfig(), train_cfg=STEPS)
    assert str(e.value) == (
        "no position of the 2 texts aligns: no character position closes a token of both "
        "tokenizers; give longer texts"
    )
