"""Realistic but fake patient and study identifiers for synthetic hospitals.

Every value is invented from a seeded generator. The names are common given and family
names; the PHI test relies on them being recognisable strings that appear nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GIVEN = (
    "Amelia", "Oliver", "Isla", "George", "Ava", "Noah", "Mia", "Arthur", "Ivy", "Leo",
    "Freya", "Oscar", "Lily", "Harry", "Rosie", "Jack", "Sofia", "Theo", "Grace", "Finn",
)  # fmt: skip
FAMILY = (
    "Hartley", "Okafor", "Lindqvist", "Moreau", "Castellano", "Nakamura", "Brennan",
    "Kowalski", "Achterberg", "Fitzgerald", "Haddad", "Oyelaran", "Sorensen", "Villanueva",
    "Drummond", "Petrov", "Abernathy", "Quintero", "Whitlock", "Zielinski",
)  # fmt: skip
PHYSICIANS = ("Dr^Rahman^Aisha", "Dr^Olsen^Magnus", "Dr^Ferreira^Lucia", "Dr^Byrne^Declan")


@dataclass(frozen=True)
class FakePatient:
    """The PHI one synthetic study carries."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_date: str
    study_time: str
    referring: str


def fake_patient(rng: np.random.Generator, site_index: int, serial: int) -> FakePatient:
    """A fake patient and study; `site_index` and `serial` keep IDs unique per run."""
    given = GIVEN[int(rng.integers(len(GIVEN)))]
    family = FAMILY[int(rng.integers(len(FAMILY)))]
    middle = chr(ord("A") + int(rng.integers(26)))
    year, month, day = (
        int(rng.integers(1935, 2005)),
        int(rng.integers(1, 13)),
        int(rng.integers(1, 29)),
    )
    study_month, study_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return FakePatient(
        name=f"{family}^{given}^{middle}",
        patient_id=f"MRN{site_index:02d}{serial:06d}{int(rng.integers(10))}",
        birth_date=f"{year:04d}{month:02d}{day:02d}",
        sex="F" if rng.random() < 0.5 else "M",
        accession=f"ACC{site_index:02d}{serial:07d}",
        study_date=f"2024{study_month:02d}{study_day:02d}",
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}00",
        referring=PHYSICIANS[int(rng.integers(len(PHYSICIANS)))],
    )
