import trio
from trio.testing import MockClock

from tests.conftest import Broker


async def test_smoke(autojump_clock: MockClock, broker: Broker) -> None:
    await broker.login()
    async with broker.client() as client:
        t1 = await client.token()
        st = await client.status()
        print(st)
        await trio.sleep(3600)
        t2 = await client.token()
        assert t2.token != t1.token
        st = await client.status()
        print(st)
        print(broker.emulator.service.counts)
