# Aggregation: all run records → results/adaptlab.duckdb (tables runs, steps, expected_runs and the SQL
# tables of adaptlab.aggregate.TABLES) → results/tables/*.csv|.md and results/figures/*.png.


localrules:
    aggregate,


rule aggregate:
    input:
        summaries=[f"{RESULTS}/runs/{r}/summary.parquet" for r in RUNS],
        steps=[f"{RESULTS}/runs/{r}/steps.parquet" for r in RUNS],
        pretrain=rules.pretrain.output.summary,
    output:
        db=RESULTS + "/adaptlab.duckdb",
        csv=[
            report(f"{RESULTS}/tables/{t}.csv", caption="../workflow/report/table.rst", category="Tables")
            for t in TABLES
        ],
        md=[f"{RESULTS}/tables/{t}.md" for t in TABLES],
        figures=[
            report(f"{RESULTS}/figures/{f}.png", caption="../workflow/report/figure.rst", category="Figures")
            for f in FIGURES
        ],
    params:
        expected=list(RUNS),
    script:
        "../workflow/scripts/aggregate.py"
