"""mmdistill.objectives: every training objective, one algorithm per file, its class beside its math.

No model loading and no I/O here: an objective declares what it needs (`Needs`), asks for a
rollout (`request()`), and turns step distributions into `(loss, metrics)` (the contract is
`mmdistill.interfaces.Objective`; the math of each is in docs/objectives.md).  Importing this
package registers every objective by its YAML name; a new objective is one file plus one import
line below (docs/architecture.md).  Import it as `mmdistill.objectives`:

    mmdistill list
"""

if __name__ != "mmdistill.objectives":  # imported by its bare folder name
    raise ImportError(
        "the folder 'objectives' is shipped as 'mmdistill.objectives'; "
        "write `from mmdistill.objectives import ...` (and install the project with `pip install -e .`)"
    )

from mmdistill.objectives import (  # noqa: F401, E402  (each module registers its objective)
    ampo,
    brts,
    dagger,
    flow_grpo,
    flow_matching,
    flow_opd,
    forward_kl,
    gkd,
    grpo,
    hard_ce,
    jsd,
    kepo,
    opd,
    opsd,
    reverse_kl,
    scope,
    sft,
    sod,
    uniopd,
)
