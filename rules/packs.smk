# Run packs (adaptlab.packs): with `pack: N` on a finetuning grid or a study section, one job trains up to N of a
# rule's runs in one process (one torch import, one data load) and writes each run's own records, exactly as the
# rule's own jobs would. One rule per pack, named <rule>_pack_<key>_<i>; its outputs are the members' outputs, so
# Snakemake picks it over the rule's own wildcard job for them (a rule without wildcards wins). Its params hold
# every member's params: a one-value change reruns the packs holding changed runs, and inside them the unchanged
# members are restored from their kept records (adaptlab.run_dir), not retrained. A pack has its highest member's
# priority (the packed rule's `priority:`), so that the long or upstream runs a rule file puts first still go
# first when Snakemake has more ready jobs than cores. On a cluster a pack asks for the
# packed rule's resources (profiles/slurm) with the runtime of all its members one after another, fused or not:
# a fused group takes longer than one member (README: 33 continual runs step in 1.8-2.8x one run's time on an
# H200, a 12-run group 4-5x on one CPU core), a job that outlives its time limit is killed, and the members one
# after another is the bound the profile's per-run runtime gives.


from snakemake.resources import Resource


def pack_threads(rule):
    """The packed rule's threads (its ``threads:``, or --set-threads)."""
    cores = rule.resources["_cores"]
    return cores.value if isinstance(cores, Resource) and not cores.is_evaluable() else 1


def pack_resources(rule, n_members):
    """The packed rule's --set-resources (profile) entry, ``runtime`` × the pack's members (Snakemake's own parsed
    ``Resource`` objects: the rule gets them as its own rule would)."""
    res = dict(workflow.resource_settings.overwrite_resources.get(rule, {}))
    runtime = res.get("runtime")
    if runtime is not None and not runtime.is_evaluable():
        res["runtime"] = Resource("runtime", runtime.value * n_members)
    return res


for _pack, _members, _priority in run_packs():
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
            members=pack_members(_base, _members),
            fuse=_pack.fuse,
        threads: pack_threads(_base)
        priority: _priority
        script:
            "../workflow/scripts/pack_run.py"
    for _name, _res in pack_resources(_pack.rule, len(_members)).items():
        getattr(rules, _pack.name).rule.resources[_name] = _res
