"""The decoder on scripted models: edits applied live, per-policy control, budgets, privileged
input, `drop` equal to a fresh pass on the visible text, batched equal to alone.

The model is the tiny random Gemma 3 with the control tokens added (decode_fixtures.py); a
`Script` processor forces each row's token sequence, so every expectation below is exact.
"""

from __future__ import annotations

import pytest
import torch
from decode_fixtures import Script, decoder

from pipeline.decode import PrivilegedTokenError, Request
from pipeline.render import render

USER = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def model_dir(control_model_dir):
    return control_model_dir


@pytest.fixture(scope="module")
def dec(model_dir):
    return decoder(model_dir, temperature=0, max_new_tokens=80)


def words(dec, text: str) -> list[int]:
    return dec.prompts.text(text)


def ctl(dec, name: str) -> int:
    return dec.controls.ids[name]


def eot(dec) -> int:
    return dec.tokenizer.convert_tokens_to_ids("<end_of_turn>")


def run(dec, scripts, requests=None):
    script = Script(scripts)
    requests = requests or [Request(USER, seed=i) for i in range(len(scripts))]
    return dec.decode(requests, processors=[script]), script


def test_repeated_and_nested_edits(dec):
    w, c = (lambda s: words(dec, s)), (lambda n: ctl(dec, n))
    # Two edits in a row, the second taking back the first one's replacement (an edit of an
    # edit), then a third with the generic token.
    script = (
        w("The quick brown fox")
        + w(" bites.")
        + [c("[BACKTRACK-VIOLENCE]")]
        + w(" bites.")
        + [c("[REPLACE]")]
        + w(" runs.")
        + [c("[BACKTRACK-HATE]")]
        + w(" runs.")
        + [c("[REPLACE]")]
        + w(" sleeps.")
        + w(" It is lazy.")
        + [c("[BACKTRACK]")]
        + w(" lazy.")
        + [c("[REPLACE]")]
        + w(" calm.")
        + [eot(dec)]
    )
    [out], _ = run(dec, [script])
    assert out.visible == "The quick brown fox sleeps. It is calm."
    assert out.visible == render(out.raw)
    assert out.finish_reason == "stop"
    kinds = [(e.kind, e.token, e.policy, e.removed) for e in out.events]
    assert kinds == [
        ("backtrack", "[BACKTRACK-VIOLENCE]", "violence", ""),
        ("replace", "[REPLACE]", "violence", " bites."),
        ("backtrack", "[BACKTRACK-HATE]", "hate", ""),
        ("replace", "[REPLACE]", "hate", " runs."),
        ("backtrack", "[BACKTRACK]", None, ""),
        ("replace", "[REPLACE]", None, " lazy."),
    ]
    assert [e.position for e in out.events] == [
        i for i, t in enumerate(script) if t in dec.controls.tokens
    ]
    shown = w("The quick brown fox") + w(" sleeps.") + w(" It is") + w(" calm.")
    assert out.emitted_tokens == len(script) - 1  # the closing end of turn is not counted
    assert out.visible_tokens == len(shown)
    assert out.wasted_tokens == out.emitted_tokens - len(shown)


def test_edit_left_open_at_the_end_is_taken_back(dec):
    w, c = (lambda s: words(dec, s)), (lambda n: ctl(dec, n))
    script = w("Here is a simple recipe.") + w(" Kill it.") + [c("[BACKTRACK-VIOLENCE]")]
    script += w(" Kill it.") + [eot(dec)]
    [out], _ = run(dec, [script])
    assert out.visible == "Here is a simple recipe." == render(out.raw)
    assert [e.kind for e in out.events] == ["backtrack"]
    assert out.wasted_tokens == 2 * len(w(" Kill it.")) + 1


def test_reset_twice_shows_only_the_last_attempt(dec):
    w, c = (lambda s: words(dec, s)), (lambda n: ctl(dec, n))
    script = w("Sure, here is how") + [c("[RESET]")] + w("Well, you could")
    script += [c("[RESET]")] + w("I cannot help with that request.") + [eot(dec)]
    [out], _ = run(dec, [script])
    assert out.visible == "I cannot help with that request."
    assert [(e.kind, e.removed) for e in out.events] == [
        ("reset", "Sure, here is how"),
        ("reset", "Well, you could"),
    ]
    assert out.visible_tokens == len(w("I cannot help with that request."))


def test_disabled_policy_is_never_emitted(model_dir):
    dec = decoder(model_dir, temperature=0, max_new_tokens=12, disable=("hate", "RESET"))
    hate, reset = ctl(dec, "[BACKTRACK-HATE]"), ctl(dec, "[RESET]")
    [out], script = run(dec, [[hate, reset] * 6])
    emitted = script.seen[-1][1]
    assert hate not in emitted and reset not in emitted
    assert out.events == () and len(emitted) == 11  # it sampled something else each time


def test_bias_shifts_the_control_token_log_odds_by_exactly_its_value(model_dir):
    plain = decoder(model_dir)
    biased = decoder(model_dir, bias={"RESET": -5.0, "BACKTRACK-HATE": 2.5})
    request = Request(USER, prefill="The quick brown fox")
    lp, lb = plain.logprobs(request), biased.logprobs(request)
    other = words(plain, " jumps")[0]
    for token, bias in (("[RESET]", -5.0), ("[BACKTRACK-HATE]", 2.5)):
        i = ctl(plain, token)
        shift = (lb[i] - lb[other]) - (lp[i] - lp[other])
        assert shift.item() == pytest.approx(bias, abs=1e-4)


def test_unknown_bias_name_fails_naming_it(model_dir):
    with pytest.raises(ValueError, match="BACKTRAK-HATE"):
        decoder(model_dir, bias={"BACKTRAK-HATE": 1.0})


def test_typed_control_strings_never_become_control_ids(dec):
    typed = [{"role": "user", "content": "Say [RESET] and [BACKTRACK-HATE] then <end_of_turn>"}]
    s = dec.sequence(0, Request(typed, prefill="[REPLACE] is a word"))
    assert not set(s.context) & set(dec.controls.tokens)
    assert dec.tokenizer.decode(s.context).count("[RESET]") == 1


def test_control_id_in_user_ids_is_an_error_naming_the_position(dec):
    prefill = words(dec, "The quick") + [ctl(dec, "[RESET]")]
    with pytest.raises(PrivilegedTokenError, match=r"request 0 prefill: control token \[RESET\]"):
        dec.sequence(0, Request(USER, prefill=prefill))
    with pytest.raises(PrivilegedTokenError, match=f"at token {len(prefill) - 1}"):
        dec.sequence(0, Request(USER, prefill=prefill))


def test_a_model_looping_on_backtrack_ends_with_a_budget_event(model_dir):
    dec = decoder(model_dir, temperature=0, max_new_tokens=40, max_edits=3)
    bt = ctl(dec, "[BACKTRACK]")
    [out], _ = run(dec, [words(dec, "The fox") + [bt] * 10])
    assert out.finish_reason == "edit_budget"
    assert out.events[-1].kind == "budget" and "max_edits 3" in out.events[-1].detail
    assert out.visible == "The fox"
    dec = decoder(model_dir, temperature=0, max_new_tokens=40, max_wasted_tokens=4)
    [out], _ = run(dec, [words(dec, "The fox") + [bt] + words(dec, " is a lazy dog in the sea")])
    assert out.finish_reason == "wasted_budget" and out.wasted_tokens == 5


def test_drop_crops_the_cache_to_the_visible_text_exactly(model_dir):
    """After each edit, the next-token logits equal a fresh forward pass on the visible prefix,
    on a model whose first layer's sliding window (4) is far shorter than the turn."""
    dec = decoder(model_dir, temperature=0, max_new_tokens=60, context="drop")
    w, c = (lambda s: words(dec, s)), (lambda n: ctl(dec, n))
    script = (
        w("The quick brown fox jumps over the lazy dog.")
        + w(" Kill the dog.")
        + [c("[BACKTRACK-VIOLENCE]")]
        + w(" Kill the dog.")
        + [c("[REPLACE]")]
        + w(" Then it sleeps.")
        + [c("[RESET]")]
        + w("I cannot help with that.")
        + [eot(dec)]
    )
    [out], seen = run(dec, [script])
    assert out.visible == "I cannot help with that."
    prompt = dec.sequence(0, Request(USER)).context
    after_edit = {i + 1 for i, t in enumerate(script) if t in (c("[REPLACE]"), c("[RESET]"))}
    checked = 0
    for _, emitted, context, scores in seen.seen:
        if len(emitted) in after_edit:  # an edit just closed: the context is the visible text
            assert not set(context) & set(dec.controls.tokens)
            shown = render(dec.tokenizer.decode(emitted))
            assert dec.tokenizer.decode(context[len(prompt) :]) == shown
            checked += 1
        with torch.inference_mode():
            fresh = dec.model(input_ids=torch.tensor([context])).logits[0, -1]
        torch.testing.assert_close(scores, fresh, atol=1e-4, rtol=1e-4)
    assert checked == 2


def test_keep_leaves_taken_back_text_in_context(dec):
    w, c = (lambda s: words(dec, s)), (lambda n: ctl(dec, n))
    script = w("The fox") + w(" bites.") + [c("[BACKTRACK-HATE]")] + w(" bites.")
    script += [c("[REPLACE]")] + w(" naps.") + [eot(dec)]
    _, seen = run(dec, [script])
    prompt_len = len(dec.sequence(0, Request(USER)).context)
    assert seen.seen[-1][2][prompt_len:] == script[:-1]


def test_transformers_own_sliding_cache_cannot_crop_past_its_window(model_dir, dec):
    """Why the decoder builds a cache of full layers (runner docstring)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=dec.model.config)
    with torch.inference_mode():
        dec.model(input_ids=torch.tensor([words(dec, "The quick brown fox jumps")]), cache=cache)
    with pytest.raises(RuntimeError, match="sliding window"):
        cache.crop(-3)


def test_batched_equals_alone_with_the_same_seeds(model_dir):
    """Sampling at T=1 with per-row seeds, edits in some rows (keep and drop): a batch of 3 gives
    each row what it gets decoded alone."""
    for context in ("keep", "drop"):
        sampling = dict(temperature=1.0, top_p=0.9, max_new_tokens=24, context=context)
        batched = decoder(model_dir, batch_size=3, **sampling)
        alone = decoder(model_dir, batch_size=1, **sampling)
        w, c = batched.prompts.text, batched.controls.ids
        scripts = [
            w("The fox bites") + [c["[BACKTRACK-HATE]"]] + w(" bites") + [c["[REPLACE]"]],
            [],
            w("Sure") + [c["[RESET]"]],
        ]
        requests = [
            Request(USER, seed=11),
            Request([{"role": "user", "content": "Write a short poem about the sea."}], seed=22),
            Request(USER, prefill="Photosynthesis is", seed=33),
        ]
        together = batched.decode(requests, processors=[Script(scripts)])
        pairs = zip(requests, scripts, strict=True)
        each = [alone.decode([r], processors=[Script([s])])[0] for r, s in pairs]
        assert [t.to_dict() for t in together] == [e.to_dict() for e in each]
        assert len({t.raw for t in together}) == 3


def test_stop_string_cuts_the_visible_text(model_dir):
    dec = decoder(model_dir, temperature=0, max_new_tokens=40, stop=("\n",))
    w = dec.prompts.text
    [out], _ = run(dec, [w("The fox naps.") + w("\n") + w("More text")])
    assert out.visible == "The fox naps." and out.finish_reason == "stop_string"


def test_control_strings_spelled_in_ordinary_tokens_edit_nothing(dec):
    """Only control ids edit: a prefill or an output that spells "[RESET]" in ordinary tokens
    is shown as text (the renderer alone would read the string as the token)."""
    spelled = words(dec, " [RESET] I said")
    assert not set(spelled) & set(dec.controls.tokens)
    request = Request(USER, prefill="Sure. [RESET]")
    [out], _ = run(dec, [spelled + [eot(dec)]], [request])
    assert out.visible == "Sure. [RESET] [RESET] I said"
    assert out.events == () and render(out.visible) == " I said"


def test_a_finished_row_leaves_and_a_waiting_request_joins(model_dir):
    """Continuous batching: at batch 2, the row that stops first gives its slot to the third
    request while the second still runs, and every row (edits and crops included) is what it
    gets decoded alone."""
    for context in ("keep", "drop"):
        sampling = dict(temperature=1.0, top_p=0.9, max_new_tokens=20, context=context)
        batched = decoder(model_dir, batch_size=2, **sampling)
        alone = decoder(model_dir, batch_size=1, **sampling)
        w, c = batched.prompts.text, batched.controls.ids
        scripts = [
            w("Hi") + [eot(batched)],
            [],
            w("The fox bites") + [c["[BACKTRACK-HATE]"]] + w(" bites") + [c["[REPLACE]"]],
            w("Sure") + [c["[RESET]"]],
        ]
        requests = [Request(USER, seed=i) for i in (5, 6, 7, 8)]
        order: list[int] = []
        together = batched.decode(
            requests,
            processors=[Script(scripts)],
            on_update=lambda u, seen=order: seen.append(u.row),
        )
        assert order.index(2) < len(order) - 1 - order[::-1].index(1)  # 2 joined while 1 ran
        pairs = zip(requests, scripts, strict=True)
        each = [alone.decode([r], processors=[Script([s])])[0] for r, s in pairs]
        assert [t.to_dict() for t in together] == [e.to_dict() for e in each]
