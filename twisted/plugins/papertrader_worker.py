from twisted.application.service import ServiceMaker

papertraderWorker = ServiceMaker("PaperTrader worker", "papertrader.worker.tap", "PaperTrader worker", "papertrader-worker")
