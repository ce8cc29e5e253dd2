"""Lightning callbacks: validation samples, toy prompt adherence, EMA export, throughput."""
