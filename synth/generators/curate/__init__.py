"""Curation from meta-information: the taxonomy and its cells (`taxonomy`), the subtopic, question and answer generators (`stages`)."""
