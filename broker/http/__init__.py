"""HTTP/1.1 serving with limits (h11 on trio), for the emulator. The Merchant API proxy
has its own reactor (broker/proxy/), where speed matters; it shares `HttpLimits`."""
