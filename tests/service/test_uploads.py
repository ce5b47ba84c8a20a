"""The streaming multipart receiver on its own: part rules, limits, file naming and clean-up.

Bodies are fed as async iterators of chunks, so chunk boundaries anywhere (inside a boundary line, a header,
the data) are exercised without a server; the HTTP behaviour is tested in ``test_segment.py``.
"""

from __future__ import annotations

import asyncio
import time
import os
import re
import stat

import pytest

from service.api.errors import ProblemError
from service.api.upload_parts import EXPECTED_PARTS
from service.api.uploads import (
    FLUSH_BYTES,
    Upload,
    check_content_type,
    receive_multipart,
)
from service.api.upload_folders import temporary_folder

BOUNDARY = b"----test-boundary-7MA4YWxkTrZu0gW"
MODALITY_NAMES = ("flair", "t1", "t1ce", "t2")


def multipart(parts: list[tuple[str | None, bytes]], *, boundary: bytes = BOUNDARY, close: bool = True,
              filename: str = "PATIENT_Jane_Doe_1970.nii.gz") -> bytes:
    """A multipart/form-data body; a part name of ``None`` leaves out the Content-Disposition header."""
    out = bytearray()
    for name, data in parts:
        out += b"--" + boundary + b"\r\n"
        if name is not None:
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n"
    return bytes(out)


async def chunked(body: bytes, size: int):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def receive(body: bytes, folder, *, size: int = 1000, max_bytes: int = 1 << 30) -> Upload:
    return asyncio.run(receive_multipart(chunked(body, size), BOUNDARY, folder, max_bytes=max_bytes))


def refused(body: bytes, folder, **kwargs) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        receive(body, folder, **kwargs)
    return info.value


def payloads(names) -> list[tuple[str, bytes]]:
    # Data that looks like a boundary start, so the parser's look-behind is exercised as well.
    return [(name, f"{name}:".encode() * 50 + b"\r\n--" + BOUNDARY[:10] + bytes(range(256))) for name in names]


class TestReceive:
    @pytest.mark.parametrize("size", [1, 7, 64, 100_000])
    def test_four_modalities_any_chunking(self, tmp_path, size):
        parts = payloads(MODALITY_NAMES) + payloads(["label"])
        upload = receive(multipart(parts), tmp_path, size=size)
        assert set(upload.files) == {*MODALITY_NAMES, "label"}
        assert upload.image_parts == MODALITY_NAMES
        assert upload.label == upload.files["label"]
        for name, data in parts:
            assert upload.files[name].read_bytes() == data
            assert upload.sizes[name] == len(data)
        assert upload.body_bytes == len(multipart(parts))

    def test_one_image_part(self, tmp_path):
        upload = receive(multipart(payloads(["image"])), tmp_path)
        assert upload.image_parts == ("image",) and upload.label is None

    def test_large_part_is_flushed_and_complete(self, tmp_path):
        data = os.urandom(FLUSH_BYTES * 2 + 12345)
        upload = receive(multipart([("image", data)]), tmp_path, size=65536)
        assert upload.files["image"].read_bytes() == data

    def test_files_get_random_private_names_never_the_client_file_name(self, tmp_path):
        upload = receive(multipart(payloads(MODALITY_NAMES)), tmp_path)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", n) for n in names)
        assert sorted(p.name for p in upload.files.values()) == names
        for path in upload.files.values():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_epilogue_after_closing_boundary_is_ignored(self, tmp_path):
        body = multipart(payloads(["image"])) + b"epilogue that is not a part\r\n--" + BOUNDARY + b"\r\n"
        assert set(receive(body, tmp_path).files) == {"image"}


class TestPartRules:
    @pytest.mark.parametrize(
        ("names", "says"),
        [
            (["flair", "t1", "t1ce"], "missing part t2"),
            (["flair", "t2"], "missing parts t1, t1ce"),
            (["label"], "no image parts"),
            ([], "no image parts"),
            (["flair", "t1", "flair"], "'flair' was sent more than once"),
            (["image", "label", "label"], "'label' was sent more than once"),
            (["image", "image"], "'image' was sent more than once"),
            (["flair", "t1", "t1ce", "t2", "seg"], "unknown part 'seg'"),
            (["FLAIR"], "unknown part 'FLAIR'"),
            (["flair", "image"], "'image' was sent together with modality parts (flair)"),
            (["image", "t1"], "modality part 't1' was sent together with part 'image'"),
        ],
    )
    def test_broken_rules_are_400_saying_what_is_expected(self, tmp_path, names, says):
        err = refused(multipart(payloads(names)), tmp_path)
        assert err.status == 400
        assert says in err.detail and err.detail.endswith(EXPECTED_PARTS)

    def test_empty_part(self, tmp_path):
        parts = payloads(["flair", "t1", "t1ce"]) + [("t2", b"")]
        err = refused(multipart(parts), tmp_path)
        assert err.status == 400 and "part 't2' is empty" in err.detail

    def test_part_without_content_disposition(self, tmp_path):
        err = refused(multipart([(None, b"data")]), tmp_path)
        assert err.status == 400 and "Content-Disposition" in err.detail

    def test_long_unknown_name_is_shortened(self, tmp_path):
        err = refused(multipart([("x" * 500, b"data")]), tmp_path)
        assert err.status == 400 and "x" * 41 not in err.detail

    def test_unknown_part_stops_reading(self, tmp_path):
        """The refusal comes at the part's headers: later chunks are never asked for."""
        body = multipart([("bogus", b"a" * 10_000)] + payloads(["image"]))
        asked = []

        async def tracked():
            for start in range(0, len(body), 100):
                asked.append(start)
                yield body[start : start + 100]

        with pytest.raises(ProblemError):
            asyncio.run(receive_multipart(tracked(), BOUNDARY, tmp_path, max_bytes=1 << 20))
        assert len(asked) <= 2

    def test_truncated_body(self, tmp_path):
        err = refused(multipart(payloads(["image"]), close=False), tmp_path)
        assert err.status == 400 and "closing boundary" in err.detail

    def test_not_multipart_at_all(self, tmp_path):
        err = refused(b'{"flair": "..."}', tmp_path)
        assert err.status == 400


class TestLimits:
    def test_over_max_bytes_is_413_and_reading_stops(self, tmp_path):
        body = multipart([("image", b"x" * 50_000)])
        asked = []

        async def tracked():
            for start in range(0, len(body), 1000):
                asked.append(start)
                yield body[start : start + 1000]

        with pytest.raises(ProblemError) as info:
            asyncio.run(receive_multipart(tracked(), BOUNDARY, tmp_path, max_bytes=10_000))
        assert info.value.status == 413 and "10000 bytes" in info.value.detail
        assert len(asked) == 11  # the chunk that crossed the limit is the last one read

    def test_exactly_max_bytes_is_accepted(self, tmp_path):
        body = multipart(payloads(["image"]))
        assert receive(body, tmp_path, max_bytes=len(body)).body_bytes == len(body)


class TestContentType:
    @pytest.mark.parametrize(
        "value", [None, "application/json", "application/octet-stream", "application/x-www-form-urlencoded",
                  "multipart/mixed; boundary=abc", "text/plain"],
    )
    def test_not_form_data_is_415(self, value):
        headers = {} if value is None else {"content-type": value}
        with pytest.raises(ProblemError) as info:
            check_content_type(headers)
        assert info.value.status == 415

    def test_content_encoding_is_415(self):
        with pytest.raises(ProblemError) as info:
            check_content_type({"content-type": "multipart/form-data; boundary=abc", "content-encoding": "gzip"})
        assert info.value.status == 415

    @pytest.mark.parametrize("value", ["multipart/form-data", "multipart/form-data; boundary=", 
                                       "multipart/form-data; boundary=" + "a" * 71])
    def test_bad_boundary_is_400(self, value):
        with pytest.raises(ProblemError) as info:
            check_content_type({"content-type": value})
        assert info.value.status == 400

    def test_boundary_is_returned(self):
        assert check_content_type({"content-type": 'Multipart/Form-Data; boundary="a b"'}) == b"a b"


class TestTemporaryFolder:
    def test_removed_after_success_and_error(self, tmp_path):
        async def use(fail: bool):
            async with temporary_folder(tmp_path) as folder:
                (folder / "x").write_bytes(b"data")
                assert stat.S_IMODE(folder.stat().st_mode) == 0o700
                if fail:
                    raise ValueError("boom")

        asyncio.run(use(False))
        with pytest.raises(ValueError):
            asyncio.run(use(True))
        assert list(tmp_path.iterdir()) == []

    def test_removed_on_cancellation(self, tmp_path):
        entered = asyncio.Event()

        async def slow():
            async with temporary_folder(tmp_path) as folder:
                (folder / "x").write_bytes(b"data")
                entered.set()
                await asyncio.sleep(60)

        async def main():
            task = asyncio.create_task(slow())
            await entered.wait()
            assert len(list(tmp_path.iterdir())) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert list(tmp_path.iterdir()) == []


class TestIdleTimeout:
    def test_stalled_body_is_408(self, tmp_path):
        body = multipart(payloads(["image"]))

        async def stalls():
            yield body[:100]
            await asyncio.sleep(30)
            yield body[100:]

        async def main():
            return await receive_multipart(stalls(), BOUNDARY, tmp_path, max_bytes=1 << 20, idle_timeout_s=0.2)

        with pytest.raises(ProblemError) as info:
            asyncio.run(asyncio.wait_for(main(), 10))
        assert info.value.status == 408 and info.value.headers.get("Connection") == "close"

    def test_slow_but_steady_body_is_accepted(self, tmp_path):
        body = multipart(payloads(["image"]))

        async def steady():
            for start in range(0, len(body), len(body) // 5 + 1):
                await asyncio.sleep(0.05)
                yield body[start : start + len(body) // 5 + 1]

        upload = asyncio.run(receive_multipart(steady(), BOUNDARY, tmp_path, max_bytes=1 << 20, idle_timeout_s=0.2))
        assert set(upload.files) == {"image"}

    def test_trickling_body_is_cut_off_at_the_deadline(self, tmp_path):
        body = multipart(payloads(["image"]))

        async def trickles():
            for i in range(len(body)):  # never idle for 0.2 s, but about 0.05 s a byte
                await asyncio.sleep(0.05)
                yield body[i : i + 1]

        async def main():
            return await receive_multipart(
                trickles(), BOUNDARY, tmp_path, max_bytes=1 << 20, idle_timeout_s=0.2, deadline_s=0.5
            )

        start = time.monotonic()
        with pytest.raises(ProblemError, match="did not arrive within 0.5 s") as info:
            asyncio.run(asyncio.wait_for(main(), 10))
        assert info.value.status == 408 and info.value.headers.get("Connection") == "close"
        assert 0.45 < time.monotonic() - start < 2

    def test_deadline_leaves_a_body_in_time_alone(self, tmp_path):
        body = multipart(payloads(["image"]))

        async def quick():
            yield body[: len(body) // 2]
            await asyncio.sleep(0.1)
            yield body[len(body) // 2 :]

        upload = asyncio.run(
            receive_multipart(quick(), BOUNDARY, tmp_path, max_bytes=1 << 20, idle_timeout_s=0.2, deadline_s=2)
        )
        assert set(upload.files) == {"image"}


def test_unwritable_temporary_storage_is_503_not_500(tmp_path):
    async def use():
        async with temporary_folder(tmp_path / "missing"):
            pass

    with pytest.raises(ProblemError) as info:
        asyncio.run(use())
    assert info.value.status == 503 and "Retry-After" in info.value.headers


class TestStorageFailure:
    def test_a_part_file_that_cannot_be_created_is_503_not_500(self, tmp_path):
        from service.api.uploads import _PartWriter

        with pytest.raises(ProblemError) as err:
            _PartWriter("flair", tmp_path / "gone")  # the folder vanished (or the disk is full)
        assert err.value.status == 503 and err.value.headers["Retry-After"] == "30"
