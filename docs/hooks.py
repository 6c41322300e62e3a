"""MkDocs hook: serve the repository's plots at their repository paths, without copying them into docs/.

Every `*.png` under `bench/` and `diffsparse/reference/assets/` becomes a site file whose URI is its path in the
repository (`bench/sweep/sweep-b2.png`), so a page in `docs/results/` shows it as `../bench/sweep/sweep-b2.png`.
"""

from pathlib import Path

from mkdocs.structure.files import File, Files

IMAGE_FOLDERS = ("bench", "diffsparse/reference/assets")


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).resolve().parent  # the repository: mkdocs.yml lives at its top
    for folder in IMAGE_FOLDERS:
        for path in sorted((root / folder).rglob("*.png")):
            uri = path.relative_to(root).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(
                    File(
                        uri,
                        src_dir=str(root),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files
