"""``headscope.probes.decoding``: the decoder sequence for teacher forcing holds the start tokens the decoder
read and every token the greedy decoding chose, the end of sequence included (Whisper's ``generate`` returns
neither), and teacher-forcing it reproduces each choice."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from headscope.models import zoo
from headscope.probes import decoding


def _teacher_forced_choices(model, inputs, sequence: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, decoder_input_ids=sequence[:, :-1]).logits.argmax(-1)


def test_tiny_t5_sequence_is_its_start_token_then_each_greedy_choice() -> None:
    t5 = tm.get("t5")
    inputs = {name: tensor for name, tensor in t5.inputs(1).items() if not name.startswith("decoder_")}
    decoded = decoding.own_output(t5.model, inputs, max_new_tokens=5)
    assert decoded.start == 1 and decoded.sequence.shape == (1, 6)
    assert decoded.sequence[0, 0] == t5.model.config.decoder_start_token_id
    assert torch.equal(_teacher_forced_choices(t5.model, inputs, decoded.sequence), decoded.targets)
    assert decoded.scored().tolist() == [[True] * 5]


@pytest.mark.slow
def test_whisper_sequence_keeps_its_start_tokens_and_the_end_of_text() -> None:
    if not zoo.PACKAGED["whisper-tiny.en"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['whisper-tiny.en'].install}`")
    import headscope
    from headscope.probes import audio
    from headscope.probes import inputs as probe_inputs

    loaded = headscope.load("whisper-tiny.en")
    inputs = probe_inputs.build(loaded).inputs
    decoded = decoding.own_output(loaded.model, inputs, max_new_tokens=64)
    ids = decoded.sequence[0].tolist()
    assert ids[:2] == [50257, 50362] and decoded.start == 2  # <|startoftranscript|><|notimestamps|>
    assert ids[-1] == 50256 and ids[-2] != 50256  # <|endoftext|>, once
    text = loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert text == audio.load_speech()[2].strip()
    choices = _teacher_forced_choices(loaded.model, inputs, decoded.sequence)
    assert torch.equal(choices[:, decoded.start - 1:], decoded.targets[:, decoded.start - 1:])
