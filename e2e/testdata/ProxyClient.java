// A plain JDK 11+ HTTP client going through an authenticating HTTP proxy, as a Java service
// would: java.net.http with a ProxySelector and an Authenticator. Run in source-file mode:
//   java [-Djdk.http.auth.tunneling.disabledSchemes=] ProxyClient.java PROXY_HOST PROXY_PORT USER URL CA_PEM
// It prints the response status and body, or the exception.
import java.io.FileInputStream;
import java.net.Authenticator;
import java.net.InetSocketAddress;
import java.net.PasswordAuthentication;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class ProxyClient {
    public static void main(String[] args) throws Exception {
        String proxyHost = args[0];
        int proxyPort = Integer.parseInt(args[1]);
        String user = args[2];
        URI uri = URI.create(args[3]);

        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null, null);
        try (FileInputStream in = new FileInputStream(args[4])) {
            trust.setCertificateEntry("lab", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(null, tmf.getTrustManagers(), null);

        HttpClient client = HttpClient.newBuilder()
            .proxy(ProxySelector.of(new InetSocketAddress(proxyHost, proxyPort)))
            .authenticator(new Authenticator() {
                @Override
                protected PasswordAuthentication getPasswordAuthentication() {
                    return new PasswordAuthentication(user, "unused".toCharArray());
                }
            })
            .sslContext(ssl)
            .connectTimeout(Duration.ofSeconds(5))
            .build();
        try {
            HttpResponse<String> resp = client.send(HttpRequest.newBuilder(uri).timeout(Duration.ofSeconds(10)).build(),
                HttpResponse.BodyHandlers.ofString());
            System.out.println("status " + resp.statusCode());
            System.out.println(resp.body());
        } catch (Exception e) {
            System.out.println("error " + e);
        }
    }
}
