"""Each paper's claims as data, checked against the results by the pipeline (table ``paper_claims``).

A study lists its paper's claims in ``CLAIMS`` (a list of ``Claim``; ``adaptlab.studies.Study``). Each claim is
one sentence, the SQL that measures it over the results database, and the rule that turns the measurement into a
verdict: a direction (``measured > threshold`` or ``< threshold``) when the paper publishes no number, or the
published value and a tolerance (``|measured - published| <= tolerance``) when it does. The SQL returns one row
``(measured, n)``: the measured value and how many results it rests on (runs, pairs, cells). A claim whose SQL
returns no row, a NULL measurement or n = 0 is ``not measured`` (its study did not run, or too little of it),
never ``not supported``. Written by hand: no library checks claims stated as SQL.
"""
from __future__ import annotations

from dataclasses import dataclass

VERDICTS = ("supported", "not supported", "not measured")

PAPER_CLAIMS_COLUMNS = ("study", "claim_id", "claim", "rule", "published", "measured", "n", "verdict", "note")


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str  # the claim, in one sentence
    sql: str  # one row: (measured, n) over the tables of the results database
    direction: str = ">"  # ">" or "<": measured vs threshold, when no published value is checked
    threshold: float = 0.0
    published: float | None = None  # the paper's number, where it gives one (same unit as measured)
    tolerance: float | None = None  # with published: supported iff |measured - published| <= tolerance
    min_n: int = 1  # fewer results than this: not measured

    def __post_init__(self):
        if self.direction not in (">", "<"):
            raise ValueError(f"claim {self.id}: direction must be '>' or '<', got {self.direction!r}")
        if (self.published is None) != (self.tolerance is None):
            raise ValueError(f"claim {self.id}: published and tolerance go together")

    @property
    def rule(self) -> str:
        if self.published is not None:
            published = f"({self.published:g})" if self.published < 0 else f"{self.published:g}"
            return f"|measured - {published}| <= {self.tolerance:g}"
        return f"measured {self.direction} {self.threshold:g}"

    def verdict(self, measured: float | None, n: int | None) -> str:
        if measured is None or not n or n < self.min_n:
            return "not measured"
        if self.published is not None:
            ok = abs(measured - self.published) <= self.tolerance
        else:
            ok = measured > self.threshold if self.direction == ">" else measured < self.threshold
        return "supported" if ok else "not supported"


def measure(con, claim: Claim) -> tuple[float | None, int | None, str | None]:
    """Run a claim's SQL: (measured, n, note); a query error is reported in the note, the claim not measured."""
    try:
        row = con.execute(claim.sql).fetchone()
    except Exception as err:  # noqa: BLE001 - a broken claim must not block the other tables
        return None, None, f"query failed: {str(err).splitlines()[0]}"
    if row is None:
        return None, 0, None
    measured, n = row[0], row[1]
    return (None if measured is None else float(measured)), (None if n is None else int(n)), None


def paper_claims_rows(con, claims_by_study: dict[str, list[Claim]]) -> list[tuple]:
    rows = []
    for section, claims in claims_by_study.items():
        for c in claims:
            measured, n, note = measure(con, c)
            rows.append((section, c.id, c.claim, c.rule, c.published, measured, n, c.verdict(measured, n), note))
    return rows


def create_paper_claims(con, name: str, claims_by_study: dict[str, list[Claim]]) -> None:
    """Create the table ``name`` (``PAPER_CLAIMS_COLUMNS``): one row per claim of every study, in registry order."""
    con.execute(f"""CREATE TABLE {name} (study VARCHAR, claim_id VARCHAR, claim VARCHAR, rule VARCHAR,
                    published DOUBLE, measured DOUBLE, n BIGINT, verdict VARCHAR, note VARCHAR)""")
    rows = paper_claims_rows(con, claims_by_study)
    if rows:
        con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(PAPER_CLAIMS_COLUMNS))})", rows)
