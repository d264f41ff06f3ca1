"""Pass options, the registry, and the pipeline text grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.errors import PipelineError
from slimgraph.passes.cleanup import Cleanup
from slimgraph.passes.fold_constants import FoldConstants
from slimgraph.passes.manager import (
    PASS_REGISTRY,
    Pass,
    PassResult,
    Pipeline,
    make_pass,
    register_pass,
)


@dataclass(frozen=True)
class OptionsPass(Pass):
    """A pass with one option of every kind the grammar supports; it does nothing."""

    name: ClassVar[str] = "test_manager_options"

    sizes: tuple[int, ...] = (1, 2)
    names: tuple[str, ...] = ()
    label: str | None = "default"
    text: str = "hello"
    ratio: float = 0.5
    limit: int | None = None
    mode: Literal["fast", "exact"] = "fast"
    flag: bool = False

    def run(self, gm, ctx) -> PassResult:
        return PassResult()


@pytest.fixture
def options_pass(register):
    return register(OptionsPass)


# ---- options are validated on construction --------------------------------------------------------

@pytest.mark.parametrize(("make", "message"), [
    (lambda: Cleanup(remove_dropout=3), "pass 'cleanup': option remove_dropout=3 must be a bool"),
    (lambda: FoldConstants(max_bytes="big"), "option max_bytes='big' must be an int"),
    (lambda: FoldConstants(max_bytes=True), "option max_bytes=True must be an int"),
    (lambda: FoldConstants(max_bytes=1.5), "option max_bytes=1.5 must be an int"),
    (lambda: OptionsPass(mode="slow"), "option mode='slow' must be one of 'fast', 'exact'"),
    (lambda: OptionsPass(sizes=(1, "2")), "must be a list of int"),
    (lambda: OptionsPass(label=3), "option label=3 must be a str or None"),
    (lambda: OptionsPass(ratio="0.5"), "option ratio='0.5' must be a float"),
])
def test_wrong_option_type_is_rejected_on_construction(make, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        make()


def test_validate_checks_ranges_beyond_types():
    with pytest.raises(PipelineError, match="max_bytes must be positive, got 0"):
        FoldConstants(max_bytes=0)


def test_python_lists_become_tuples_for_every_pass():
    """Options hold tuples (hashable, frozen); a Python caller's list is accepted and converted."""
    assert OptionsPass(sizes=[1, 2]).sizes == (1, 2)
    assert str(OptionsPass(sizes=[1, 2])) == str(OptionsPass(sizes=(1, 2)))
    with pytest.raises(PipelineError, match=re.escape("option sizes=(1, '2') must be a list of int")):
        OptionsPass(sizes=[1, "2"])


def test_int_is_accepted_for_float_and_none_for_optional():
    assert OptionsPass(ratio=1, limit=None, label=None).ratio == 1


# ---- text form ---------------------------------------------------------------------------------

def test_parse_round_trips_through_str():
    text = "cleanup, fold_constants(max_bytes=1024)"
    pipeline = Pipeline.parse(text)
    assert [type(p) for p in pipeline] == [Cleanup, FoldConstants]
    assert pipeline.passes[1].max_bytes == 1024
    assert str(pipeline) == text
    assert Pipeline.parse(str(pipeline)) == pipeline


def test_str_omits_options_left_at_their_default():
    assert str(Pipeline.parse("cleanup(remove_dropout=true), fold_constants")) == "cleanup, fold_constants"
    assert str(Cleanup(remove_asserts=False)) == "cleanup(remove_asserts=false)"


def test_values_of_every_kind_parse_to_the_declared_types(options_pass):
    (p,) = Pipeline.parse(
        "test_manager_options(sizes=[4, 5], names=[a, 'b c', \"d,e\"], label=none, text=12, "
        "ratio=1, limit=7, mode=exact, flag=TRUE)"
    )
    assert p.sizes == (4, 5)
    assert p.names == ("a", "b c", "d,e")
    assert p.label is None
    assert p.text == "12"
    assert p.ratio == 1.0 and isinstance(p.ratio, float)
    assert p.limit == 7
    assert p.mode == "exact"
    assert p.flag is True


def test_empty_list_and_none_parse(options_pass):
    (p,) = Pipeline.parse("test_manager_options(sizes=[], limit=none, flag=false)")
    assert p.sizes == () and p.limit is None and p.flag is False


def test_none_for_an_optional_string_is_none_not_the_string(options_pass):
    assert Pipeline.parse("test_manager_options(label=none)").passes[0].label is None
    assert Pipeline.parse("test_manager_options(label='none')").passes[0].label == "none"


@pytest.mark.parametrize("text", ["none", "true", "False", "12", "1e3", "-4", "inf", "", "a b", "x,y", "it's",
                                  "\xa0", "back\\slash", "two\nlines"])
def test_strings_that_look_like_other_values_round_trip(options_pass, text):
    p = OptionsPass(text=text, label=text)
    assert Pipeline.parse(str(p)).passes[0] == p


# Any text without a double quote: the grammar has no escapes, so it quotes with the other kind.
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters='"'), max_size=12)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(-10**12, 10**12), max_size=4).map(tuple),
       names=st.lists(_TEXT, max_size=3).map(tuple),
       label=st.none() | _TEXT, text=_TEXT,
       ratio=st.floats(allow_nan=False, width=64), limit=st.none() | st.integers(),
       mode=st.sampled_from(["fast", "exact"]), flag=st.booleans())
def test_any_options_round_trip_through_text(sizes, names, label, text, ratio, limit, mode, flag):
    PASS_REGISTRY[OptionsPass.name] = OptionsPass
    try:
        p = OptionsPass(sizes, names, label, text, ratio, limit, mode, flag)
        assert Pipeline.parse(str(p)) == Pipeline((p,))
        assert Pipeline.parse(f"cleanup, {p}, fold_constants").passes[1] == p
    finally:
        PASS_REGISTRY.pop(OptionsPass.name, None)


# ---- errors ----------------------------------------------------------------------------------------

def test_unknown_pass_names_it_the_choices_and_the_closest():
    with pytest.raises(PipelineError) as error:
        Pipeline.parse("cleanp")
    message = str(error.value)
    assert "unknown pass 'cleanp'" in message
    assert "Valid passes: cleanup, fold_constants" in message
    assert "Did you mean 'cleanup'?" in message
    assert message.splitlines()[-2:] == ["  cleanp", "  ^"]


def test_unknown_pass_after_others_points_at_it():
    with pytest.raises(PipelineError) as error:
        Pipeline.parse("cleanup, fold_constant")
    assert "Did you mean 'fold_constants'?" in str(error.value)
    assert str(error.value).splitlines()[-1] == "  " + " " * 9 + "^"


def test_make_pass_rejects_unknown_names_too():
    with pytest.raises(PipelineError, match="unknown pass 'fold_constans'.*Did you mean 'fold_constants'"):
        make_pass("fold_constans")


def test_unknown_option_names_it_the_choices_and_the_closest():
    with pytest.raises(PipelineError) as error:
        Pipeline.parse("cleanup(remove_dropot=true)")
    message = str(error.value)
    assert "pass 'cleanup' has no option 'remove_dropot'" in message
    assert "Valid options: remove_asserts, remove_dropout, remove_noop_views" in message
    assert "Did you mean 'remove_dropout'?" in message


def test_wrong_type_in_text_names_the_option():
    with pytest.raises(PipelineError, match="option max_bytes='lots' must be an int"):
        Pipeline.parse("fold_constants(max_bytes=lots)")


@pytest.mark.parametrize(("text", "column", "message"), [
    ("cleanup fold_constants", 8, "expected ',' between passes"),
    ("cleanup,", 8, "expected a pass name, found the end of the text"),
    ("cleanup(remove_dropout=true", 27, "expected ',', found the end of the text"),
    ("cleanup(remove_dropout=)", 23, "expected a value, found ')'"),
    ("cleanup('x'=1)", 8, "expected an option name, found ''x''"),
    ("cleanup(remove_dropout true)", 23, "expected '=', found 'true'"),
    ("cleanup(remove_dropout='x)", 23, "unexpected character"),
    ("cleanup(remove_dropout=[true, false)", 35, "expected ',', found ')'"),
])
def test_syntax_errors_show_a_caret_at_the_position(text, column, message):
    with pytest.raises(PipelineError) as error:
        Pipeline.parse(text)
    lines = str(error.value).splitlines()
    assert lines[0] == message
    assert lines[1:] == ["  " + text, "  " + " " * column + "^"]


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_pipeline_is_an_error(text):
    with pytest.raises(PipelineError, match="empty pipeline"):
        Pipeline.parse(text)


# ---- coerce and the registry ---------------------------------------------------------------------------

def test_coerce_accepts_text_pass_list_and_pipeline():
    expected = Pipeline((Cleanup(), FoldConstants(max_bytes=64)))
    assert Pipeline.coerce("cleanup, fold_constants(max_bytes=64)") == expected
    assert Pipeline.coerce(Cleanup()) == Pipeline((Cleanup(),))
    assert Pipeline.coerce([Cleanup(), "fold_constants(max_bytes=64)"]) == expected
    assert Pipeline.coerce(["cleanup, fold_constants(max_bytes=64)"]) == expected
    assert Pipeline.coerce(expected) is expected
    assert len(Pipeline.coerce([])) == 0


def test_register_pass_rejects_unknown_analyses():
    @dataclass(frozen=True)
    class NeedsUnknown(Pass):
        name: ClassVar[str] = "test_manager_needs_unknown"
        requires: ClassVar[tuple[str, ...]] = ("shapez",)

    with pytest.raises(TypeError, match=r"unknown analyses \['shapez'\]; known: .*'shapes'"):
        register_pass(NeedsUnknown)
    assert "test_manager_needs_unknown" not in PASS_REGISTRY


def test_register_pass_rejects_unknown_preserved_analyses():
    @dataclass(frozen=True)
    class PreservesUnknown(Pass):
        name: ClassVar[str] = "test_manager_preserves_unknown"
        preserves: ClassVar[tuple[str, ...]] = ("shapes", "colours")

    with pytest.raises(TypeError, match=r"unknown analyses \['colours'\]"):
        register_pass(PreservesUnknown)
    assert "test_manager_preserves_unknown" not in PASS_REGISTRY


def test_register_pass_needs_a_name():
    @dataclass(frozen=True)
    class Nameless(Pass):
        pass

    with pytest.raises(TypeError, match="needs a non-empty `name`"):
        register_pass(Nameless)


def test_registered_pass_is_available_by_name(options_pass):
    assert PASS_REGISTRY["test_manager_options"] is OptionsPass
    assert make_pass("test_manager_options", ratio=2.0) == OptionsPass(ratio=2.0)


def test_option_given_twice_is_an_error():
    with pytest.raises(PipelineError, match="option 'max_bytes' is given twice") as error:
        Pipeline.parse("fold_constants(max_bytes=1, max_bytes=2)")
    assert error.value.args[0].splitlines()[-1].index("^") == len("  fold_constants(max_bytes=1, ")


def test_missing_required_option_names_it(register):
    @register
    @dataclass(frozen=True)
    class NeedsRank(Pass):
        name: ClassVar[str] = "needs_rank_test"
        rank: int

    with pytest.raises(PipelineError, match=r"pass 'needs_rank_test' needs option\(s\) rank"):
        Pipeline.parse("needs_rank_test")
    assert Pipeline.parse("needs_rank_test(rank=4)").passes[0].rank == 4
