"""The evaluation protocol of ``shared/data/README.md`` as code: fixed splits, roles and per-set rules.

What the files cannot tell (the TREC DL relevance level for binary measures, ArguAna's
self-match rule, the prompt wording per set, which queries each role uses) is fixed in
:data:`PROTOCOL`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .beir import BeirDataset, load_beir


class Role(StrEnum):
    FIT = "fit"  # router training and head search
    IN_DOMAIN_TEST = "in-domain-test"  # scored after fitting on the same domain's fit split
    CROSS_DOMAIN_TEST = "cross-domain-test"  # never fitted on


@dataclass(frozen=True)
class SetSpec:
    """What the protocol fixes about a set that its files cannot tell."""

    name: str
    binary_rel: int = 1  # lowest grade that counts as relevant in binary measures (recall)
    drop_self_match: bool = False  # drop a retrieved doc whose id equals the query id
    instruction: str = "relevance"  # prompt wording: "question" for QA sets, as ICR's code does
    group_pattern: str | None = None  # regex whose first group names a query's group (paraphrases kept together)
    domain: str = ""  # the kind of search it stands for; leave-one-domain-out leaves every fit set of one out

    def group(self, qid: str) -> str:
        """The group a query belongs to (its own id unless the set groups queries): train/dev splits keep a
        group on one side."""
        if self.group_pattern is not None:
            match = re.match(self.group_pattern, qid)
            if match:
                return match.group(1)
        return qid


@dataclass(frozen=True)
class ProtocolEntry:
    """One (set, role): which qrels split and which of its judged queries."""

    name: str
    role: Role
    n_queries: int  # the count data/README.md states; checked on selection
    split: str = "test"  # qrels/<split>.tsv
    first: int | None = None  # keep the first N judged ids (sorted as strings)
    last: int | None = None  # keep the last N judged ids (sorted as strings)

    def select(self, judged_ids: Iterable[str]) -> list[str]:
        ids = sorted(judged_ids)
        if self.first is not None:
            ids = ids[: self.first]
        if self.last is not None:
            ids = ids[-self.last :] if self.last else []
        return ids


@dataclass(frozen=True)
class Protocol:
    """The fixed splits, candidate depth, passage cut and measures of every reported number."""

    entries: tuple[ProtocolEntry, ...]
    sets: Mapping[str, SetSpec]
    top_k: int = 20  # candidates per query handed to the re-ranker
    max_words: int = 100  # passages cut to their first 100 words, title included
    measure: str = "nDCG@10"  # graded, linear gain, ideal over every judged doc (ir_measures)
    recall_depth: int = 20  # recall@20 of the candidate list

    def spec(self, name: str) -> SetSpec:
        """The set's spec; a set outside the protocol gets the defaults."""
        return self.sets.get(name, SetSpec(name))

    def domains(self, role: Role | str = Role.FIT) -> dict[str, list[str]]:
        """``{domain: [set names]}`` of the sets with ``role``, in protocol order."""
        out: dict[str, list[str]] = {}
        for entry in self.entries_for(role):
            out.setdefault(self.spec(entry.name).domain or entry.name, []).append(entry.name)
        return out

    def entries_for(self, role: Role | str) -> list[ProtocolEntry]:
        role = Role(role)
        return [e for e in self.entries if e.role is role]

    def entry(self, name: str, role: Role | str) -> ProtocolEntry:
        role = Role(role)
        for e in self.entries:
            if e.name == name and e.role is role:
                return e
        roles = [e.role.value for e in self.entries if e.name == name]
        raise KeyError(
            f"{name!r} has no {role.value!r} split in the protocol"
            + (f"; its roles: {', '.join(roles)}" if roles else "; it is not a protocol set")
        )



PROTOCOL = Protocol(
    entries=(
        ProtocolEntry("beir-scifact", Role.FIT, 809, split="train"),
        ProtocolEntry("musique-ans-train100", Role.FIT, 100),
        ProtocolEntry("hotpotqa-distractor-dev500", Role.FIT, 400, first=400),
        ProtocolEntry("trec-dl-2019", Role.FIT, 43),
        ProtocolEntry("nq-open-gold2655", Role.FIT, 1000, first=1000),
        ProtocolEntry("stackfaq", Role.FIT, 400, first=400),  # the first 40 threads: ~10 paraphrases each
        ProtocolEntry("dbpedia-entity-test40", Role.FIT, 40),
        ProtocolEntry("beir-scifact", Role.IN_DOMAIN_TEST, 300),
        ProtocolEntry("hotpotqa-distractor-dev500", Role.IN_DOMAIN_TEST, 100, last=100),
        ProtocolEntry("trec-dl-2020", Role.CROSS_DOMAIN_TEST, 54),
        ProtocolEntry("beir-arguana", Role.CROSS_DOMAIN_TEST, 200, first=200),
        ProtocolEntry("musique-ans-migres200", Role.CROSS_DOMAIN_TEST, 200),
        ProtocolEntry("cacm", Role.CROSS_DOMAIN_TEST, 52),
        ProtocolEntry("npl", Role.CROSS_DOMAIN_TEST, 93),
    ),
    sets={
        s.name: s
        for s in (
            SetSpec("trec-dl-2019", binary_rel=2, domain="web search"),  # TREC DL: grade >= 2 is relevant
            SetSpec("trec-dl-2020", binary_rel=2, domain="web search"),
            SetSpec("beir-arguana", drop_self_match=True, domain="argument retrieval"),  # as MTEB does
            SetSpec("beir-scifact", domain="science claims"),
            SetSpec("hotpotqa-distractor-dev500", instruction="question", domain="multi-hop Wikipedia QA"),
            SetSpec("musique-ans-migres200", instruction="question", domain="multi-hop Wikipedia QA"),
            SetSpec("musique-ans-train100", instruction="question", domain="multi-hop Wikipedia QA"),
            SetSpec("cacm", domain="computer science abstracts"),
            SetSpec("npl", domain="physics titles"),
            SetSpec("nq-open-gold2655", instruction="question", domain="single-hop Wikipedia QA"),
            SetSpec("stackfaq", group_pattern=r"^(t\d+)r", domain="StackExchange FAQ"),  # ~10 paraphrases per thread
            SetSpec("dbpedia-entity-test40", domain="entity search"),
        )
    },
)


def protocol_queries(dataset: BeirDataset, role: Role | str) -> list[str]:
    """The protocol's ordered query ids of ``dataset`` for ``role``.

    Only queries with qrels in the dataset's split count; ids are sorted as
    strings before any first/last-N cut. Raises if the dataset was loaded with
    another split than the protocol's, or if the count differs from the one
    ``data/README.md`` states.
    """
    entry = PROTOCOL.entry(dataset.name, role)
    if dataset.split != entry.split:
        raise ValueError(
            f"{dataset.name} {entry.role.value} uses qrels/{entry.split}.tsv but the dataset "
            f"was loaded with split={dataset.split!r}; use load_beir(..., split={entry.split!r})"
        )
    ids = entry.select(dataset.qrels)
    if len(ids) != entry.n_queries:
        raise ValueError(
            f"{dataset.name} {entry.role.value}: {len(ids)} queries, the protocol expects "
            f"{entry.n_queries}; is {dataset.path} the set data/README.md describes?"
        )
    return ids


def load_protocol_set(
    name: str, role: Role | str, data_dir: Path | str | None = None
) -> tuple[BeirDataset, list[str]]:
    """Load a protocol set with the split its role uses; return it with its query ids."""
    entry = PROTOCOL.entry(name, role)
    dataset = load_beir(name, split=entry.split, data_dir=data_dir)
    return dataset, protocol_queries(dataset, role)


def select_queries(
    dataset: BeirDataset, max_queries: int | None = None, *, last: bool = False
) -> list[str]:
    """Judged query ids sorted as strings; the first (or, with ``last``, the last)
    ``max_queries`` of them. For ad-hoc runs; reported numbers use :func:`protocol_queries`."""
    ids = dataset.judged_query_ids()
    if max_queries is None:
        return ids
    if max_queries < 0:
        raise ValueError(f"max_queries must be >= 0, got {max_queries}")
    if last:
        return ids[len(ids) - max_queries :] if max_queries else []
    return ids[:max_queries]


def instruction_for(instruction: str, dataset_name: str | None = None) -> str:
    """The named wording to score a set with: ``"auto"`` is the protocol's choice for a known set
    (``"question"`` for the multi-hop QA sets), else ``"relevance"``; any other name is kept."""
    if instruction != "auto":
        return instruction
    return PROTOCOL.spec(dataset_name).instruction if dataset_name else "relevance"
