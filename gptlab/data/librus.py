"""lib.ru / az.lib.ru pages: download once into a cache directory, then clean to text.

Only http(s) URLs are fetched, with a timeout, retries with backoff and a size cap; a
page already in the download directory is never fetched again, so a run offline works
from the cache, and a URL that is neither cached nor reachable is a clear error.
"""
import hashlib
import html
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from .sources import DataError, FileSource, Source, decoded_blocks, resolve_files, split_units

log = logging.getLogger(__name__)

SECTION_BEGINS = "<!--Section Begins-->"  # az.lib.ru marks the work's text with these
SECTION_ENDS = "<!--Section Ends-->"
_DROP = re.compile(r"<!--.*?-->|<(script|style|head|form|select|noscript)\b.*?</\1\s*>", re.S | re.I)
_BREAK = re.compile(r"<\s*/?\s*(br|p|dd|dt|div|h[1-6]|li|tr|pre|blockquote|table|center)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]*>")
_TEXT_START = re.compile(r"<\s*(dd|pre)\b", re.I)


def clean_librus_html(page: str) -> str:
    """The work's text from a lib.ru page: one paragraph per line, no markup, no blank lines."""
    start = page.find(SECTION_BEGINS)
    if start >= 0:
        end = page.find(SECTION_ENDS, start)
        page = page[start + len(SECTION_BEGINS):end if end >= 0 else len(page)]
    else:  # plain lib.ru: the page header ends with the last `-->` before the text
        first = _TEXT_START.search(page)
        header_end = page.rfind("-->", 0, first.start() if first else len(page))
        if header_end >= 0:
            page = page[header_end + 3:]
    page = _DROP.sub("", page)
    page = _BREAK.sub("\n", page)
    # tags go before entities are unescaped, or an escaped `&lt;` would read as a tag
    text = html.unescape(_TAG.sub("", page)).replace("\xa0", " ")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def cached_path(url: str, directory: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlsplit(url).path).name)[-60:] or "page"
    return directory / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"


def fetch(url: str, directory: Path, timeout_s: float, retries: int, max_bytes: int,
          backoff_s: float = 1.0) -> Path:
    """The cached copy of `url`, downloaded first if it is not in `directory` yet."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DataError(f"data.urls: {url!r} is not an http(s) URL")
    dest = cached_path(url, directory)
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    error = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), 30.0))
        try:
            body = _download(url, timeout_s, max_bytes)
        except (urllib.error.URLError, OSError) as e:  # timeouts are OSErrors
            error = getattr(e, "reason", None) or e
            log.warning("download %s failed (try %d of %d): %s", url, attempt + 1, retries + 1, error)
            continue
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(body)
        tmp.rename(dest)
        log.info("downloaded %s (%d bytes) to %s", url, len(body), dest)
        return dest
    raise DataError(f"data.urls: {url} is not in the download cache {directory} and could not be downloaded "
                    f"after {retries + 1} tries ({error}); save the page as {dest} or list local pages in data.files")


def _download(url: str, timeout_s: float, max_bytes: int) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "gptlab"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        if urllib.parse.urlsplit(r.geturl()).scheme not in ("http", "https"):
            raise DataError(f"data.urls: {url} redirected to {r.geturl()}, which is not http(s)")
        length = r.headers.get("Content-Length")
        if length and int(length) > max_bytes:
            raise DataError(f"data.urls: {url} is {int(length)} bytes, over data.download_max_bytes={max_bytes}")
        body = r.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise DataError(f"data.urls: {url} is over data.download_max_bytes={max_bytes} bytes")
    return body


class LibrusSource(FileSource):
    """Pages from `urls` (downloaded) and from local `files`; one document per page by default."""
    name = "librus_html"
    KEYS = ("urls", "encoding", "text_unit")

    def __init__(self, settings, cache_root):
        Source.__init__(self, settings, cache_root)
        if not settings.urls and not settings.files:
            raise DataError("the librus_html source needs data.urls or local pages in data.files")
        for url in settings.urls:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise DataError(f"data.urls: {url!r} is not an http(s) URL")
        self.parts = {"train": resolve_files(settings.files, "data.files"),
                      "valid": resolve_files(settings.valid_files, "data.valid_files")}
        self.download_dir = Path(settings.download_dir or cache_root / "downloads").expanduser()

    def documents(self, part: str = "train") -> Iterator:
        pages = list(self.parts[part])
        if part == "train":  # downloads happen here, on the building process only
            s = self.s
            pages = [fetch(u, self.download_dir, s.download_timeout_s, s.download_retries, s.download_max_bytes)
                     for u in s.urls] + pages
        for i, path in enumerate(pages):
            text = clean_librus_html("".join(decoded_blocks(path, self.s.encoding)))
            for j, doc in enumerate(split_units(iter([text]), self.s.text_unit)):
                yield f"{part}/{i}/{path.name}#{j}", doc
