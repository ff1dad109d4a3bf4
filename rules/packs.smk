# Run packs (adaptlab.packs): with `pack: N` on a finetuning grid or a study section, one job trains up to N of a
# rule's runs in one process (one torch import, one data load) and writes each run's own records, exactly as the
# rule's own jobs would. One rule per pack, named <rule>_pack_<key>_<i>; its outputs are the members' outputs, so
# Snakemake picks it over the rule's own wildcard job for them (a rule without wildcards wins). Its params hold
# every member's params: a one-value change reruns the packs holding changed runs, and inside them the unchanged
# members are restored from their kept records (adaptlab.run_dir), not retrained. On a cluster a pack asks for the
# packed rule's resources (profiles/slurm): the runtime of all its members one after another, or of one member
# when the pack trains fused (its runs step together).


def pack_resources(rule, n_members, fused):
    """The packed rule's --set-resources (profile) entry, ``runtime`` × the members that run one after another."""
    res = dict(workflow.resource_settings.overwrite_resources.get(rule, {}))
    if isinstance(res.get("runtime"), (int, float)) and not fused:
        res["runtime"] = res["runtime"] * n_members
    return res


for _pack, _members in run_packs():
    _base = getattr(rules, _pack.rule).rule

    rule:
        name:
            _pack.name
        input:
            sorted({p for m in _members for v in m["input"].values() for p in ([v] if isinstance(v, str) else v)}),
        output:
            [path for m in _members for path in m["output"]],
        log:
            [m["log"] for m in _members],
        params:
            members=stable_json(_members),
            fuse=_pack.fuse,
        threads: _base.resources["_cores"] if isinstance(_base.resources["_cores"], int) else 1
        resources:
            **pack_resources(_pack.rule, len(_members), _pack.fuse),
        script:
            "../workflow/scripts/pack_run.py"
