from twisted.application.service import ServiceMaker

papertraderMaster = ServiceMaker("PaperTrader master", "papertrader.master.tap", "PaperTrader master", "papertrader-master")
