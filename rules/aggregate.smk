# Aggregation: the records of every expected run (pretraining, finetuning grids, each study's runs) →
# results/adaptlab.duckdb (runs, steps, expected_runs, the studies' raw tables and the SQL tables of
# adaptlab.aggregate.all_tables()) → results/tables/*.csv|.md, results/figures/*.png and results/report.rst, the
# opening page of `snakemake --report` (paper claims and run states).


localrules:
    aggregate,


rule aggregate:
    input:
        summaries=[summary_file(r) for r in EXPECTED],
    output:
        db=RESULTS + "/adaptlab.duckdb",
        csv=[
            report(f"{RESULTS}/tables/{t}.csv", caption="../workflow/report/table.rst", category="Tables")
            for t in all_tables()
        ],
        md=[f"{RESULTS}/tables/{t}.md" for t in all_tables()],
        figures=[
            report(f"{RESULTS}/figures/{f}.png", caption="../workflow/report/figure.rst", category="Figures")
            for f in all_figures()
        ],
        overview=RESULTS + "/" + OVERVIEW_NAME,
    log:
        RESULTS + "/logs/aggregate.log",
    params:
        expected=EXPECTED,
        # a quarantine of corrupt records (adaptlab.run_state) reruns the aggregation and, through it, those runs
        quarantined=lambda wildcards: quarantine_events(RESULTS, EXPECTED),
    script:
        "../workflow/scripts/aggregate.py"
