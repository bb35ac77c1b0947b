"""The files of a study's report: report.json, report.md, DICOM SR, FHIR."""
