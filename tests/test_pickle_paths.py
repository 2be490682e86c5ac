"""Saved modules name classes and functions by their module paths: those paths are part of
the file format, so a module moved inside the package must not change them."""

from __future__ import annotations

import base64
import pickle
import pickletools
import zlib

import pytest
import torch

import convexmix as cx

#: The convexmix modules that pickles of the layers and constrained modules may name.
STABLE = {
    "convexmix.nn",
    "convexmix.parametrize",
    "convexmix._subclass",
    "convexmix.functional._registry",
    "convexmix.functional._softmax",
    "convexmix.functional._sparse",
    "convexmix.functional._stick",
}


def _globals(obj: object) -> set[str]:
    """The ``module`` of every global a pickle of ``obj`` refers to."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(pickle.dumps(obj)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(strings[-2])
        elif op.name == "GLOBAL":
            found.add(str(arg).split(" ")[0])
    return {m for m in found if m.startswith("convexmix")}


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "entmax15", "stick_breaking"])
def test_saved_modules_name_only_stable_paths(name: str) -> None:
    modules = [
        cx.SimplexWeights(3, map=name),
        cx.WeightedSum(3, map=name),
        cx.ScalarMix(3),
        cx.simplex_(torch.nn.Linear(3, 1), "weight", map=name),
    ]
    for module in modules:
        assert _globals(module) <= STABLE, type(module).__name__
    assert "convexmix.nn" in _globals(cx.WeightedSum(2))


#: ``zlib``-compressed ``pickle.dumps`` of four modules saved by convexmix 0.1.0 as of
#: commit 71c0e5f (before the layers' weights went through one ``Simplex`` call):
#: ``WeightedSum(3, upper=0.45, sources=["a", "b", "c"], channels=2, bias=True)`` with free
#: values ``[[3, 1], [0, 0], [-1, 0]]`` and bias 0.5, ``SimplexWeights(3,
#: map="stick_breaking", init=[0.2, 0.3, 0.5])``, ``ScalarMix(3, init=[0.2, 0.3, 0.5],
#: gamma=1.5)`` and ``simplex_(Linear(3, 2, bias=False), "weight", map="sparsemax",
#: upper=0.6)`` (seed 0).
SAVED_BEFORE = (
    "eNrlV81v3EQUX6+dbLKbhjYRH21K1eNGQqtN0iQblbKlhUbCJNAGib1Uo1nv7I4Te7z2jPMBihQOLQkaqYcOByr+"
    "ACT+ASQkwgUJocJfwI0LvXFFQpRnez/zAb20KGDJO+P3fh7PvPd7H7tjfPr16VR83VZ5OWJ5bJ1suvZmgTElc+8T"
    "u0EFqa2ErrqvJj9S2wAaEgG2mc0aalfmUBMH2CWCBDxWGlUbcyVHhBdYtIBCYTvwOIYCUg1tp9aFw3o026MQhHEv"
    "QOvToMjLU8n7HAbcIEqeRo6Ha6geeC6qbgnCAXVN11KpnfQnWeePz2/8fnH1i3fPFnbSS490+N32U/lKdLBm4AnP"
    "8hy0Dju0PeZrAKicAo1jC+EQRFjNxsxP71ayIBRbTYK4/QHhvr7tG/nKAAg59QLhD5jpig5PNhP+oGlUjGgNjzX8"
    "jGmEIXwzX8lE4GTLfsqKj5C9ARsXK4kw62uVUcAszCxMFUsLpZnZqVKp5CfrWs3Q1830svCNm7DabT91FFbDhXSq"
    "c5WjW91Rt5SZMtN3lKndUXsyB+d1iCXguGD73DtBjQSk9oZticiJt5QA/C49C7OPYSaNekCIoiN0NE/PXBs/6UYt"
    "FotzB4w6eJxRW1gw6mDHplevggHKXRvv7Ee/bSODh+4qM21qd9VebMJ+Y4ZyCFXDej0JBzmBmMdQM7ISB4KLtg5x"
    "ItQ9JcdRFVtrGziAwAgIop63xlW8mHyuq+oVv4Bsjuqh4/Sr1bIcRXUvOIQ/1y9FG7agKHqv0UacP4DAzgbe4sjC"
    "wKFaCzPWwRzc5oXDmiO+cQZxgQVBNeBg3+vP9yoOrn0uCfq/QUwcRni8/wtDyPVqoUNifwxZFDNGICWZaZnhXhhY"
    "oIgyn4aV1KpwW4pIA9KbUDITMhtO58KM227TIZuw4W6GbKWyAIgNiJUWop0m6eAuzWwr+grchXuKFuPt0OlkuLRM"
    "Z5PZfDIsJMPlZLiSDOVkeD0ZrifDm8mwCMcxeJNY4IPunuohi+MeOwXIrA1gXbAFm1vCzZUI2snhBoOtR+fy6sLF"
    "cK5My41Kvnz0am0kde8D2mZR6EPWaEBqbqlQWwgAoxZ4TYiXsCr1mu3CTA4IT2BHLZZ/S+JK5gRxITSwCAPSIx4I"
    "myAFwc8Po+tHWEJjytTDKtXkaMvMSWHih6x9sZ3GTnZtWJiaX5ievVR8ktrQxfbUhpeCqf3N79L7B2vDESmLP02K"
    "0i1Tpzfpe88sJmid2q2POXKUC9taQ9WA4LWoX6FMThzD7gio6JfQlPjA6dFE0MNoKkwNGBi+9Rguut6hK93oTjeX"
    "w2rM0uEVyJ44WLIPpQM50MCui9vV9vrjk83RUml2fq6Po9qxHE2wwFGtU1q/bfcuk5PPnJlSBw4o+uEx+SNzsvPH"
    "dLEEJp+d7vONfrRvOljwjd7yzOn0T/vfTzzYj/JIp/X5H+WQ1SeJdC6zLHSRg7eids/UZTaeQs8HPcOePJU8RZXQ"
    "C4VabLMeCtp4NwshHlYtB3MetSqtP0NRvlmRLyb/gRgrtDqYgmMzggMlB99OJlBoBzfiSgg+ivzQtU+eDi/LXKJE"
    "/6kGf35udmZ6au6JGvw2tqfB/3Pmm9cefHa2/Kt89OpXcz9cuVB+ED93KqWpQ4OvH9vgP9WclLMZqpO4I4oJNQLE"
    "6RGkoRHvMAe1e9JttWqAT/+tIjvMoRHmJO4NmTx/TH2NMWr1Mmy0VWPHUOfF/jqb+sc6u1j+ZSa+IAbDKin8BQ8p"
    "klk="
)


def test_modules_pickled_before_the_one_route_load_and_compute_the_same() -> None:
    ws, sw, mix, lin = pickle.loads(zlib.decompress(base64.b64decode(SAVED_BEFORE)))
    # the weights those modules computed when they were saved (recorded then)
    expected = torch.tensor([[0.450000, 0.450000], [0.402082, 0.275000], [0.147918, 0.275000]])
    torch.testing.assert_close(ws.weights, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(sw(), torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(mix.weights, torch.tensor([0.2, 0.3, 0.5]))
    torch.testing.assert_close(
        lin.weight,
        torch.tensor([[0.371490, 0.6, 0.028510], [0.098737, 0.301263, 0.6]]),
        atol=2e-6,
        rtol=0,
    )
    assert sorted(ws.state_dict()) == ["bias", "free"]
    assert sorted(lin.state_dict()) == ["weight_free"]
    # and they take the one route now: every input form gives the capped mix
    xs = [torch.randn(4, 2) for _ in range(3)]
    ref = (ws.weights[:, None] * torch.stack(xs)).sum(0) + 0.5
    for form in (xs, tuple(xs), torch.stack(xs), dict(zip("abc", xs, strict=True))):
        torch.testing.assert_close(ws(form), ref)
