"""persam_core's tests, laid out as its packages (modeling/, methods/, speed/, video/,
evaluation/; its top-level modules' tests here). The oracles and stand-ins they share stay in
this folder: as a conftest's folder it is on sys.path for the subfolders' tests too."""
