"""`rwkv2rknn estimate OUT --draft DRAFT_OUT [--acceptance p]`: PREDICTED ms/token with speculative decoding."""

from __future__ import annotations

from rwkv2rknn.cli import console as make_console

SHOWN_K = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15)


def add_arguments(p) -> None:
    p.add_argument("--draft", metavar="DRAFT_OUT",
                   help="a draft model's split/build output (same tokenizer): also predict decoding with it "
                   "(speculative decoding; OUT needs a verify plan: split --verify-tokens K): the curve over the "
                   "acceptance rate and k, and the k each board profile should use")
    p.add_argument("--acceptance", type=float, action="append", metavar="P",
                   help="with --draft: acceptance rate(s) of drafted tokens to price, measured (python -m "
                   "rwkv2rknn.run OUT --draft DRAFT_OUT --bench) or assumed (repeatable; default 0.5 ... 0.9)")


def check(args) -> None:
    from rwkv2rknn.errors import UserError

    if args.draft is None and args.acceptance:
        raise UserError("--acceptance goes with --draft DRAFT_OUT")
    for p in args.acceptance or []:
        if not 0.0 <= p < 1.0:
            raise UserError(f"--acceptance {p}: give a rate in [0, 1)")


def run(args, data: dict, program, named_profile, loader, runtime_profiles: dict, loader_of) -> dict:
    """The speculative estimate on every runtime profile (`runtime_profiles`: name -> runtime, and the named one);
    printed unless --json. loader_of(manifest): the segment loader of a manifest (the draft's)."""
    from rwkv2rknn.cost.estimate import program_of, with_features
    from rwkv2rknn.cost.profile import load_profile
    from rwkv2rknn.cost.speculative import ACCEPTANCE_GRID, speculative_estimate
    from rwkv2rknn.manifest import Manifest

    draft_manifest = Manifest.load(args.draft, check_files=False)
    draft_loader = loader_of(draft_manifest)
    draft, _ = with_features(draft_manifest.data, draft_loader)
    precision = args.precision or (data.get("build") or {}).get("precision", "fp16")
    dprog = program_of(draft, precision)
    ps = tuple(sorted(set(args.acceptance))) if args.acceptance else ACCEPTANCE_GRID
    if args.acceptance:
        ps = tuple(sorted(set(ps) | set(ACCEPTANCE_GRID)))
    out = {}
    names = list(runtime_profiles) + ([named_profile.name] if named_profile.name not in runtime_profiles else [])
    for name in names:
        prof = named_profile if name == named_profile.name else load_profile(name)
        est = speculative_estimate(data, draft, prof, args.precision, ps, target_program=program,
                                   draft_program=dprog, loader=loader, draft_loader=draft_loader)
        out[name] = est.to_dict()
        out[name]["acceptance_given"] = sorted(set(args.acceptance)) if args.acceptance else None
    if not args.json:
        print_tables(out, named_profile.name, args.acceptance)
    return out


def print_tables(out: dict, named: str, given) -> None:
    from rich.table import Table

    console = make_console()
    est = out[named]
    ks = [k for k in SHOWN_K if str(k) in est["verify_ms"] or k in est["verify_ms"]]
    table = Table(title=f"speculative decoding, ms per token by acceptance rate p and drafted tokens k: PREDICTED "
                        f"(board profile {named}, {est['precision']}; plain decode {est['plain_ms_per_token']:.1f} "
                        f"ms/token, a draft step {est['draft_ms_per_token']:.1f} ms)", title_justify="left")
    table.add_column("p")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    table.add_column("best k", justify="right")
    table.add_column("tokens/pass", justify="right")
    table.add_column("speed-up", justify="right")
    by = {(pt["p"], pt["k"]): pt for pt in est["curve"]}
    for p, best in sorted(est["best"].items(), key=lambda kv: float(kv[0])):
        p = float(p)
        mark = " (given)" if given and p in given else ""
        table.add_row(f"{p:g}{mark}", *[f"{by[(p, k)]['ms_per_token']:.1f}" for k in ks], str(best["k"]),
                      f"{best['tokens_per_pass']:.2f}", f"{best['speedup']:.2f}x")
    console.print(table)
    vt = Table(title="one verify pass by rows, and what a round costs besides (PREDICTED)", title_justify="left")
    vt.add_column("k")
    vt.add_column("verify pass ms (k+1 rows)", justify="right")
    for k in ks:
        vt.add_row(str(k), f"{est['verify_ms'][k]:.1f}")
    console.print(vt)
    console.print(f"rollback copies {est['state_bytes'] / 2**20:.1f} MiB of state after a rejection; the draft keeps "
                  f"{est['draft_state_bytes'] / 2**20:.2f} MiB snapshots; the verify plan in OUT has "
                  f"{est['verify_rows_built']} rows (split --verify-tokens k for the k picked)", soft_wrap=True)
    pick = Table(title="k picked per board profile (PREDICTED ms/token at the lowest-cost k)", title_justify="left")
    pick.add_column("board profile")
    for p in sorted(float(x) for x in est["best"]):
        pick.add_column(f"p={p:g}", justify="right")
    pick.add_column("plain decode", justify="right")
    for name, e in out.items():
        cells = [f"k={b['k']}: {b['ms_per_token']:.1f}" for _, b in sorted(e["best"].items(), key=lambda kv: float(kv[0]))]
        pick.add_row(name, *cells, f"{e['plain_ms_per_token']:.1f}")
    console.print(pick)
    console.print("These are predictions, not measurements: the acceptance model assumes each draft is kept "
                  "independently with probability p (docs/speculative.md).", soft_wrap=True)


__all__ = ["add_arguments", "check", "run"]
