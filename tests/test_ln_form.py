"""norms._ln_form (one pass over a polynomial's terms) against the set-based definition: the
poly is c*G*r*x - c*G*r*m + B, with exactly one term holding x, one holding m, and no source
symbol in B. Checked on every polynomial of a small grammar (terms over x, m, r and two
constants), so a shortcut that accepts or rejects differently fails here."""

from __future__ import annotations

import itertools

from normopt.norms import _SOURCES, _Poly, _ln_form


def _reference(poly):
    xs = {k: v for k, v in poly.t.items() if any(s_ == "x" for s_, _ in k)}
    ms = {k: v for k, v in poly.t.items() if any(s_ == "m" for s_, _ in k)}
    rest = {k: v for k, v in poly.t.items() if k not in xs and k not in ms}
    if len(xs) != 1 or len(ms) != 1 or any(s_ in _SOURCES for k in rest for s_, _ in k):
        return None
    (kx, cx), = xs.items()
    (km, cm), = ms.items()
    px, pm = dict(kx), dict(km)
    if px.pop("x", 0) != 1 or px.pop("r", 0) != 1 or pm.pop("m", 0) != 1 or pm.pop("r", 0) != 1:
        return None
    if px != pm or abs(cx + cm) > 1e-9 * abs(cm) or any(s_ in _SOURCES for s_ in px):
        return None
    return cx, tuple(sorted(px.items())), rest


def _monomials():
    syms = [("x", (0, 1)), ("m", (0, 1)), ("r", (-1, 0, 1)), ("k0", (0, 1)), ("k1", (0, -1))]
    for powers in itertools.product(*[p for _, p in syms]):
        yield tuple(sorted((s, p) for (s, _), p in zip(syms, powers) if p))


def test_ln_form_agrees_with_its_definition():
    monos = list(_monomials())
    accepted = 0
    for a, b in itertools.combinations(range(len(monos)), 2):
        for coefs in ((1.0, -1.0), (2.0, -2.0), (1.0, 1.0)):
            for extra in (None, 0, len(monos) - 1):
                terms = {monos[a]: coefs[0], monos[b]: coefs[1]}
                if extra is not None and monos[extra] not in terms:
                    terms[monos[extra]] = 0.5
                p = _Poly(terms)
                want, got = _reference(p), _ln_form(p)
                assert got == want, (terms, got, want)
                accepted += want is not None
    assert accepted > 0  # the grammar holds LN forms


def test_ln_form_of_a_layernorm():
    x, m, r, g, b = (_Poly.sym(s) for s in ("x", "m", "r", "k0", "k1"))
    c, gmono, rest = _ln_form((x - m) * r * g + b)
    assert c == 1.0 and gmono == (("k0", 1),) and rest == {(("k1", 1),): 1.0}
    assert _ln_form((x - m) * r * x) is None and _ln_form((x - m) * g + b) is None
