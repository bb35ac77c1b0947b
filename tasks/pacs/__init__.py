"""radflow as a PACS citizen, over DICOMweb (PS3.18): a PACS as a screening source
(``store``), SRs published back by STOW-RS (``publish``), and an Orthanc's stable studies as
Prefect events (``orthanc``). Submodules are imported where used: pool processes import
``version`` alone."""
