"""The reader LM's pretraining: its tokenizer holds every board word as one token, its document stream
follows the configured shares, and a test-size run is deterministic and learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from vlmablate.world.board import N_CELLS, BoardEmbedding, attribute_words, single_token_id
from vlmablate.world.reader import (
    DocumentStream,
    ReaderConfig,
    batch_inputs,
    llama_config,
    train_reader,
    world_tokenizer,
)
from vlmablate.world.reading import Encoder, ReadingConfig

TINY = ReaderConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, steps=40, batch_size=8, lr=3e-3,
                    pool=2, eval_every=20, probe_per_kind=10,
                    reading=ReadingConfig(kinds=("colour", "shape"), curriculum_steps=20))


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


def test_the_world_tokenizer_has_every_board_word_as_one_token(tokenizer):
    ids = [single_token_id(tokenizer, w) for w in attribute_words()]
    assert len(set(ids)) == len(ids) == 21  # 2 sizes, 6 colours, 5 shapes, 2 fills, 2 marks, 4 place words
    assert [len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) for x in "ABCD"] == [1, 1, 1, 1]
    assert world_tokenizer().get_vocab() == tokenizer.get_vocab()  # a fixed corpus: the same tokenizer


def test_the_document_stream_follows_its_shares(tokenizer):
    enc = Encoder(tokenizer)
    only_text = DocumentStream(dataclasses.replace(TINY, text_share=1.0, caption_share=0.0), enc)
    docs = [d for step in range(1, 5) for d in only_text.batch(step)]
    assert len(docs) == 4 * TINY.batch_size
    assert all(d.scene is None and enc.image_token_id not in d.input_ids and all(d.learn) for d in docs)
    only_captions = DocumentStream(dataclasses.replace(TINY, text_share=0.0, caption_share=1.0), enc)
    for d in only_captions.batch(1):
        assert d.input_ids[1: 1 + N_CELLS] == [enc.image_token_id] * N_CELLS
        assert d.learn == [False] * (1 + N_CELLS) + [True] * (len(d.input_ids) - 1 - N_CELLS)
        assert tokenizer.decode(d.input_ids[1 + N_CELLS:]).endswith("\n")
    # Grouped by length: a pool of batches is sorted before it is cut.
    reading = DocumentStream(dataclasses.replace(TINY, text_share=0.0, caption_share=0.0, pool=4), enc)
    batches = [reading.batch(1) for _ in range(4)]
    spans = sorted((min(len(d.input_ids) for d in b), max(len(d.input_ids) for d in b)) for b in batches)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))


def test_mixed_batches_embed_boards_only_where_there_are_image_tokens(tokenizer):
    enc = Encoder(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(TINY, tokenizer))
    board = BoardEmbedding(TINY.hidden, enc.vocab.place_ids)
    docs = DocumentStream(dataclasses.replace(TINY, text_share=0.5, caption_share=0.0, pool=1), enc).batch(1)
    inputs, labels, mask = batch_inputs(model, board, enc, docs)
    pad = tokenizer.pad_token_id
    plain = model.get_input_embeddings()(torch.tensor([d.input_ids + [pad] * (inputs.shape[1] - len(d.input_ids))
                                                       for d in docs]))
    for i, d in enumerate(docs):
        differs = (inputs[i] != plain[i]).any(-1)
        expected = torch.zeros(inputs.shape[1], dtype=torch.bool)
        expected[: len(d.input_ids)] = torch.tensor(d.input_ids) == enc.image_token_id
        assert torch.equal(differs, expected)
    assert int(mask.sum()) == sum(len(d.input_ids) for d in docs)


def test_a_test_size_reader_is_deterministic_and_learns(tokenizer):
    model, board, metrics = train_reader(TINY, tokenizer, progress=False, log=lambda row: None)
    again, board_again, metrics_again = train_reader(TINY, tokenizer, progress=False, log=lambda row: None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(board.place, board_again.place)
    untimed = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # noqa: E731
    assert untimed(metrics["probe"]) == untimed(metrics_again["probe"])
    assert [e["step"] for e in metrics["probe"]] == [20, 40]
    assert set(metrics["probe"][-1]["probe"]) == set(metrics["blank"]) == {"colour", "shape"}
    assert metrics["probe"][-1]["loss"] < metrics["probe"][0]["loss"] < 7.0


def test_the_attention_loss_is_minus_log_the_attention_on_each_target():
    from vlmablate.world.reader import attention_loss, parse_attend
    from vlmablate.world.reading import ReadingDoc, Target

    doc = ReadingDoc([0] * 8, [True] * 8, targets=[Target(asked=6, answer=7, cells=(1,), key=5, match=(1, 2))])
    weights = torch.zeros(1, 2, 8, 8)  # [batch, heads, query, key]
    weights[0, 0, 5, 1], weights[0, 0, 5, 2] = 0.5, 0.25  # layer 0 head 0 at the key word: 3/4 on the match
    weights[0, 1, 7, 5] = 0.125  # head 1 at the answer position: 1/8 on the key word
    weights[0, 1, 5, 4] = 0.5  # head 1 at the key word: 1/2 on the previous token
    losses = attention_loss([weights, weights], [doc], ("0.0:key>cells", "0.0:key>match", "1.1:answer>key",
                                                        "0.1:key>prev", "0.1:question>cells"))
    expected = -torch.log(torch.tensor([0.5, 0.75, 0.125, 0.5, 0.0]) + 1e-6)
    torch.testing.assert_close(losses, expected)
    assert parse_attend("2.0:answer>cells") == (2, 0, "answer", "cells")
    for bad in ("2:answer>cells", "2.0:cells>answer", "two.0:key>cells"):
        with pytest.raises(ValueError, match="attention supervision"):
            parse_attend(bad)


def test_attention_supervision_teaches_its_head_to_look_at_the_key():
    cfg = dataclasses.replace(TINY, steps=30, attend_loss=1.0, attend=("1.0:answer>key",))
    _, _, metrics = train_reader(cfg, world_tokenizer(), progress=False, log=lambda row: None)
    first, last = metrics["probe"][0]["attend"][0], metrics["probe"][-1]["attend"][0]
    assert last < 0.6 * first, (first, last)  # 3.11 -> 1.59 here: from ~1/22 of its attention to ~1/5


def test_the_readout_loss_scores_the_answer_through_the_lm_head_early(tokenizer):
    from vlmablate.world.reader import readout_loss
    from vlmablate.world.reading import ReadingDoc, Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(TINY, tokenizer))
    ids = [5, 6, 7, 8, 9, 10]
    doc = ReadingDoc(ids, [True] * 6, targets=[Target(asked=2, answer=3, cells=(0,), key=1, match=(0,))])
    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = F.cross_entropy(model.lm_head(model.model.norm(hidden[1][0, 3:4])), torch.tensor([9]))
    torch.testing.assert_close(readout_loss(model, hidden, [doc], (0,)), expected)
    # The last layer's read-out is the LM's own loss on the answer's first token.
    last = F.cross_entropy(model(torch.tensor([ids])).logits[0, 3:4], torch.tensor([9]))
    torch.testing.assert_close(readout_loss(model, hidden, [doc], (TINY.layers - 1,)), last, rtol=1e-4, atol=1e-4)


def test_the_readout_of_all_tokens_scores_every_answer_token_but_descriptions(tokenizer):
    from vlmablate.world.reader import readout_loss
    from vlmablate.world.reading import ReadingDoc, Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(TINY, tokenizer))
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    # answers: tokens 3-4 (a two-token answer), 6 (a description, not read out), 8 (one token)
    doc = ReadingDoc(ids, [True] * 9, answers=[(3, 5, "position"), (6, 7, "describe"), (8, 9, "colour")],
                     targets=[Target(asked=1, answer=2, cells=(0,), key=1, match=(0,))])
    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    logits = model.lm_head(model.model.norm(hidden[1][0]))
    expected = F.cross_entropy(logits[[2, 3, 7]], torch.tensor([8, 9, 13]))
    torch.testing.assert_close(readout_loss(model, hidden, [doc], (0,), tokens="all"), expected)
    first = F.cross_entropy(logits[[2]], torch.tensor([8]))  # "first": the target's answer position only
    torch.testing.assert_close(readout_loss(model, hidden, [doc], (0,), tokens="first"), first)
    with pytest.raises(ValueError, match="readout_tokens is 'first' or 'all', not 'some'"):
        ReaderConfig(readout_tokens="some")


def test_supervision_must_name_layers_and_heads_the_lm_has():
    assert ReaderConfig().attend[-1] == "3.0:answer>cells" and ReaderConfig().readout_layers == (1, 2)
    ReaderConfig(layers=2)  # off by default: nothing to check
    with pytest.raises(ValueError, match=r"\['2.0:answer>key', '3.0:answer>cells'\] name layers or heads a 2-layer"):
        ReaderConfig(layers=2, attend_loss=1.0)
    with pytest.raises(ValueError, match=r"read-out after layer 2"):
        ReaderConfig(layers=2, readout_loss=1.0)


def test_the_choice_routes_supervise_options_and_the_answer():
    from vlmablate.world.reader import attention_loss
    from vlmablate.world.reading import Choice, ReadingDoc

    # key word at 1; "A. red" -> letter 3, option 4; "B. top left" -> letter 6, options 7-8; answer at 10
    choice = Choice(answer=10, letters=(3, 6), options=((4,), (7, 8)), correct=1, content=99, key=1,
                    letter_ids=(50, 51))
    doc = ReadingDoc([0] * 12, [True] * 12, choices=[choice])
    weights = torch.zeros(1, 1, 12, 12)
    weights[0, 0, 4, 3], weights[0, 0, 7, 6], weights[0, 0, 8, 6] = 0.5, 0.25, 1.0  # options on their letters
    weights[0, 0, 4, 1], weights[0, 0, 7, 1], weights[0, 0, 8, 1] = 0.5, 0.5, 0.0  # options on the key word
    weights[0, 0, 10, 7], weights[0, 0, 10, 8] = 0.25, 0.5  # the answer on the right option's two tokens
    losses = attention_loss([weights], [doc], ("0.0:option>letter", "0.0:option>key", "0.0:answer>option"))
    nll = lambda *p: -torch.log(torch.tensor(p) + 1e-6).mean()  # noqa: E731
    torch.testing.assert_close(losses, torch.stack([nll(0.5, 0.25, 1.0), nll(0.5, 0.5, 0.0), nll(0.75)]))


def test_a_choice_answer_reads_out_its_option_and_each_option_its_letter(tokenizer):
    from vlmablate.world.reader import letter_readout_loss, readout_loss
    from vlmablate.world.reading import Choice, ReadingDoc, Target

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(TINY, tokenizer))
    ids = list(range(20, 32))
    choice = Choice(answer=9, letters=(3, 6), options=((4,), (7, 8)), correct=1, content=77, key=1,
                    letter_ids=(50, 51))
    doc = ReadingDoc(ids, [True] * 12, answers=[(10, 12, "position")], choices=[choice],
                     targets=[Target(asked=2, answer=9, cells=(0,), key=1, match=(0,))])
    hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    logits = model.lm_head(model.model.norm(hidden[1][0]))
    # the answer position reads out the right option's first token (77), not the letter ids[10] nor </s>
    for tokens in ("first", "all"):
        torch.testing.assert_close(readout_loss(model, hidden, [doc], (0,), tokens=tokens),
                                   F.cross_entropy(logits[[9]], torch.tensor([77])))
    torch.testing.assert_close(letter_readout_loss(model, hidden, [doc], (0,)),
                               F.cross_entropy(logits[[4, 7, 8]], torch.tensor([50, 51, 51])))


def test_training_can_continue_a_given_model(tokenizer):
    enc = Encoder(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(TINY, tokenizer))
    board = BoardEmbedding(TINY.hidden, enc.vocab.place_ids)
    before = model.lm_head.weight.detach().clone()
    cfg = dataclasses.replace(TINY, steps=2, eval_every=2)
    trained, trained_board, _ = train_reader(cfg, tokenizer, progress=False, log=lambda row: None,
                                             start_from=(model, board))
    assert trained is model and trained_board is board  # trained in place, not replaced
    assert not torch.equal(model.lm_head.weight, before)
    with pytest.raises(ValueError, match="read-out after layer 2"):
        ReaderConfig(layers=2, letter_readout=1.0)
